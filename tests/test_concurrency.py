"""One Model shared by many threads: each thread's sequence gives exactly what it gives alone, and
misusing one sequence from two threads is refused, never silently wrong."""

from __future__ import annotations

import threading

import pytest

from neoedge import Model, SequenceBusyError, SessionSettings

PROMPTS = ["Open the file", "Return a list", "The default value", "Raise an error if",
           "Create a new", "Read the lines", "Write the data to", "Close the connection"]


@pytest.fixture(scope="module")
def model(package) -> Model:
    return Model(package, settings=SessionSettings(intra_threads=2))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.95, seed=7)],
                         ids=["greedy", "seeded sampling"])
def test_eight_threads_match_serial_runs(model, sampling):
    options = dict(max_new_tokens=40, stop_at_eos=False, logprobs=True, **sampling)
    serial = [model.generate(p, **options) for p in PROMPTS]
    results: list = [None] * len(PROMPTS)
    start = threading.Barrier(len(PROMPTS))

    def work(i: int) -> None:
        seq = model.sequence()
        start.wait()
        results[i] = seq.generate(PROMPTS[i], **options)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, serial):
        assert got.tokens == expected.tokens and got.text == expected.text
        assert got.logprobs == expected.logprobs


def test_one_sequence_from_two_threads_is_refused(model):
    seq = model.sequence("Open the file")
    stream = seq.stream(max_new_tokens=50, stop_at_eos=False)
    next(stream)  # this thread is generating on seq
    errors: list[BaseException] = []

    def intrude() -> None:
        try:
            seq.generate(max_new_tokens=5)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=intrude)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], SequenceBusyError)
    rest = list(stream)
    assert len(rest) == 49  # the first call went on undisturbed


def test_a_stream_iterated_from_two_threads_at_once_is_refused(model, monkeypatch):
    seq = model.sequence("Open the file")
    stream = seq.stream(max_new_tokens=5, stop_at_eos=False)
    inside, tried = threading.Event(), threading.Event()
    original = model.runner.step

    def step(*args, **kwargs):  # hold the first decode step until the other thread has tried
        inside.set()
        tried.wait(5)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.runner, "step", step)
    outcome: list = []

    def other() -> None:
        inside.wait(5)
        try:
            next(stream)
            outcome.append("ran")
        except BaseException as exc:
            outcome.append(exc)
        finally:
            tried.set()

    thread = threading.Thread(target=other)
    thread.start()
    events = list(stream)
    thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], SequenceBusyError)
    assert len(events) == 5 and events[-1].finish_reason is not None


def test_scoring_checks_its_room_holding_the_sequence(model):
    """Another thread's append between scoring's checks and its pass cannot make it run past the
    context: the room is checked with the sequence held, so it is a ContextFullError."""
    import numpy as np

    from neoedge import ContextFullError

    context = model.info.context_length
    ids = np.random.default_rng(1).integers(0, model.info.vocab_size, size=context).tolist()
    seq = model.sequence(tokens=ids[:100])
    acquire = seq._acquire

    def the_other_thread_first(what):
        if what == "score":
            other = threading.Thread(target=lambda: seq.append(tokens=ids[100:250]))
            other.start()
            other.join()
        return acquire(what)

    seq._acquire = the_other_thread_first
    with pytest.raises(ContextFullError, match="does not fit after the sequence's 250 tokens"):
        seq.score([ids[:40]])
