"""Scoring continuations: log-probs equal transformers' log-softmax, the prompt is processed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neoedge import Model, PromptError

TOLERANCE = 1e-4


def _reference_logprobs(reference, prompt: list[int], continuation: list[int]) -> np.ndarray:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids).logits[0].double(), -1).numpy()
    rows = np.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return logp[rows, continuation]


@pytest.mark.parametrize("name,attention", [("window8", "gqa"), ("window8", "plain"), ("window4", "gqa")])
def test_scores_equal_transformers_log_softmax(packages, reference_model, name, attention):
    model = Model(packages[(name, attention)])
    reference = reference_model(name)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.info.vocab_size, 23).tolist()
    # Short ones, and one longer than a prefill chunk that crosses the local window many times.
    continuations = [rng.integers(0, model.info.vocab_size, n).tolist() for n in (1, 2, 5, 40)]
    scores = model.score(prompt, continuations)
    for continuation, score in zip(continuations, scores):
        expected = _reference_logprobs(reference, prompt, continuation)
        assert score.tokens == tuple(continuation)
        np.testing.assert_allclose(score.logprobs, expected, atol=TOLERANCE, rtol=0)
        assert score.total == pytest.approx(expected.sum(), abs=TOLERANCE * len(continuation))


def test_greedy_flag_and_text_continuations(package):
    model = Model(package)
    prompt = "Return the number of"
    greedy = model.generate(prompt, max_new_tokens=4, stop_at_eos=False)
    other = list(greedy.tokens)
    other[-1] = (other[-1] + 1) % model.info.vocab_size
    scores = model.score(prompt, [list(greedy.tokens), other, " items"])
    assert scores[0].greedy and not scores[1].greedy
    assert scores[0].logprobs[:3] == scores[1].logprobs[:3]  # same prefix, same cache, same numbers
    assert scores[2].tokens == tuple(model.encode(" items"))


def test_scoring_leaves_a_sequence_as_it_was(package):
    model = Model(package)
    seq = model.sequence("Open the file and read")
    before = seq.fork()
    seq.score([" it", " the lines of text in the file one by one until the end is reached"])
    a = seq.generate(max_new_tokens=20, stop_at_eos=False, logprobs=True)
    b = before.generate(max_new_tokens=20, stop_at_eos=False, logprobs=True)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs


def test_bad_continuations_are_refused(package):
    model = Model(package)
    with pytest.raises(PromptError, match="continuation is empty"):
        model.score("x", [[]])
    with pytest.raises(PromptError, match="more than the .* that fit"):
        model.score("x", [[1] * (model.info.context_length + 1)])
    with pytest.raises(PromptError, match="must be in"):
        model.score("x", [[model.info.vocab_size]])


@pytest.mark.parametrize("rows, vocab", [(5, 50257), (40, 50257), (17, 33)])
def test_native_log_softmax_matches_float64(rows, vocab):
    """The kernel library's log_softmax_at (two reads a row, two threads from 16 rows) against a
    float64 log-softmax: within 1e-6 (measured up to 1.6e-8; numpy's float32 path 1e-6), the first index of
    a tied maximum counted as the argmax, as numpy's argmax does, rows of a strided view, and rows
    with a NaN or an infinite logit given numpy's answer."""
    from neoedge.kernels import log_softmax as native
    from neoedge.scoring import _numpy_log_softmax_at, log_softmax_at

    rng = np.random.default_rng(rows)
    wide = (rng.standard_normal((rows, vocab + 7)) * 4).astype(np.float32)
    logits = wide[:, :vocab]  # rows not contiguous with each other
    targets = rng.integers(0, vocab, rows)
    logits[0, [3, 9]] = logits[0].max() + 1.0  # a tie for the maximum: index 3 is the argmax
    targets[0], targets[1] = 9, int(logits[1].argmax())
    logits[2, 5] = np.nan
    logits[3, 0] = np.inf
    if native.log_softmax_at(logits, targets) is None:
        pytest.skip("the native kernel library (AVX-512) is not available here")
    logprobs, greedy = log_softmax_at(logits, targets)
    x = logits.astype(np.float64)
    peak = x.max(-1, keepdims=True)
    exact = (x - peak - np.log(np.exp(x - peak).sum(-1, keepdims=True)))[np.arange(rows), targets]
    finite = np.isfinite(x).all(-1)
    np.testing.assert_allclose(logprobs[finite], exact[finite], rtol=0, atol=1e-6)
    expected_logprobs, expected_greedy = _numpy_log_softmax_at(logits, targets)
    np.testing.assert_array_equal(greedy, expected_greedy)
    assert not greedy[0] and greedy[1]
    np.testing.assert_array_equal(np.isnan(logprobs), np.isnan(expected_logprobs))


def test_native_log_softmax_refuses_targets_of_another_length():
    """The library reads one target per row through a raw pointer: fewer targets than rows would
    read past them, so the call is refused before it."""
    from neoedge.kernels import log_softmax as native

    logits = np.zeros((4, 64), np.float32)
    if native.log_softmax_at(logits, np.zeros(4, np.int64)) is None:
        pytest.skip("the native kernel library (AVX-512) is not available here")
    with pytest.raises(ValueError, match=r"4 rows of logits but targets of shape \(1,\)"):
        native.log_softmax_at(logits, np.zeros(1, np.int64))


def test_native_helpers_say_why_they_are_off(monkeypatch):
    from neoedge import kernels

    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    assert kernels.avx512_function("neoedge_log_softmax_at", None, []) == (None, f"{kernels.DISABLE_VARIABLE}=0")
    monkeypatch.delenv(kernels.DISABLE_VARIABLE)
    if not kernels.library_path().exists():
        pytest.skip("the native kernel library is not built here")
    function, why = kernels.avx512_function("neoedge_no_such_function", None, [])
    assert function is None and ("lacks neoedge_no_such_function" in why or "AVX-512" in why)


def test_scoring_an_empty_sequence_leaves_it_empty(package):
    """An empty sequence scores after bos, and gives the bos back: what it generates afterwards is
    what a fresh sequence generates."""
    model = Model(package)
    seq = model.sequence()
    seq.score([" it"])
    assert seq.tokens == ()
    assert seq.generate("Open", max_new_tokens=5, stop_at_eos=False).tokens == \
        model.sequence().generate("Open", max_new_tokens=5, stop_at_eos=False).tokens


def test_cancelled_scoring_is_a_clear_error(package):
    from neoedge import CancelToken
    from neoedge.loglikelihood import score_pairs

    model = Model(package)
    token = CancelToken()
    token.cancel()
    seq = model.sequence("Open the file and read every line of it")
    with pytest.raises(PromptError, match="scoring was cancelled"):
        seq.score([" it now"], cancel=token)
    assert seq.tokens == tuple(model.encode("Open the file and read every line of it"))
    with pytest.raises(PromptError, match="scoring was cancelled"):
        score_pairs(model, [(model.encode("Open the file"), model.encode(" and read"))], cancel=token)
