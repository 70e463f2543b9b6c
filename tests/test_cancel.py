"""Cancelling: from another thread, within one step while decoding, within one chunk (or one node)
while processing a prompt; afterwards the sequence holds what was made and stays usable."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from neoedge import CancelToken, FinishReason, Model
from neoedge.runner import Terminated


@pytest.fixture(scope="module")
def model(package) -> Model:
    return Model(package)


def test_cancel_during_decode_stops_within_one_step(model):
    seq = model.sequence("Open the file")
    stream = seq.stream(max_new_tokens=200, stop_at_eos=False)
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 5:
            threading.Thread(target=stream.cancel).start()
    assert events[-1].finish_reason == FinishReason.CANCELLED
    assert 6 <= len(events) <= 7  # the 5 before the cancel, at most one step more, and the final event
    made = [e.token for e in events if e.token is not None]
    assert seq.tokens[-len(made):] == tuple(made)
    assert stream.completion.finish_reason == FinishReason.CANCELLED
    assert stream.completion.tokens == tuple(made)
    again = seq.generate(max_new_tokens=3, stop_at_eos=False)
    assert again.usage.new_tokens == 3 and again.finish_reason == FinishReason.LENGTH


def test_cancel_during_a_long_prefill_leaves_the_rest_pending(packages, monkeypatch):
    model = Model(packages[("context2048", "gqa")])
    prompt = np.random.default_rng(0).integers(0, model.info.vocab_size, 1900).tolist()
    token = CancelToken()
    original = model.runner.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            token.cancel()  # as if the user pressed Stop while the third chunk runs
        return original(*args, **kwargs)

    monkeypatch.setattr(model.runner, "forward", forward)
    seq = model.sequence(tokens=prompt)
    completion = seq.generate(max_new_tokens=5, cancel=token, stop_at_eos=False)
    assert completion.finish_reason == FinishReason.CANCELLED and completion.tokens == ()
    assert len(calls) == 3
    chunk = model.runner.chunk
    assert seq.cached == 2 * chunk  # the third chunk was stopped inside onnxruntime, not advanced
    assert seq.tokens == tuple(prompt)  # nothing lost: the rest is pending
    monkeypatch.undo()
    resumed = seq.generate(max_new_tokens=5, stop_at_eos=False)
    fresh = model.sequence(tokens=prompt).generate(max_new_tokens=5, stop_at_eos=False)
    assert resumed.tokens == fresh.tokens and resumed.usage.cached_tokens == 2 * chunk


def test_onnxruntime_stops_a_pass_whose_run_options_are_terminated(model):
    state = model.runner.new_state(64)
    options = ort.RunOptions()
    options.terminate = True
    with pytest.raises(Terminated):
        model.runner.forward(state, np.arange(10, dtype=np.int64), run_options=options)
    assert state.cache.length == 0


def test_a_token_cancelled_before_the_call_stops_it_at_once(model):
    token = CancelToken()
    token.cancel()
    seq = model.sequence("Open the file")
    completion = seq.generate(max_new_tokens=50, cancel=token)
    assert completion.finish_reason == FinishReason.CANCELLED and completion.tokens == ()
    assert seq.cached == 0 and seq.tokens == tuple(model.encode("Open the file"))


def test_forward_passes_run_with_options_onnxruntime_reads_without_an_exception():
    """The RunOptions a call's passes (and its cancel) use set the graph-capture key onnxruntime's
    Python wrapper looks up on every run: unset, the lookup raises and catches a C++ exception per
    pass (~25 µs, about 1% of a 125M decode step). Terminating them still cancels (tests above)."""
    from neoedge.sequence import _RunLink

    link = _RunLink(None)
    try:
        assert link.run_options.get_run_config_entry("gpu_graph_id") == "-1"
        link.cancel.cancel()
        assert link.run_options.terminate
    finally:
        link.close()
