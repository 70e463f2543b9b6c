"""Batched decode and continuous batching: every row gets exactly what it gets alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from neoedge import FinishReason, Model
from neoedge.engine import Engine, EngineSettings, generate_batch
from neoedge.errors import EngineClosedError, QueueFullError


@pytest.fixture(scope="module", params=[("window8", "gqa"), ("window4", "gqa"), ("window8", "plain")],
                ids=lambda p: "-".join(p))
def model(request, packages) -> Model:
    return Model(packages[request.param])


def _prompts(model: Model, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, model.info.vocab_size, n).tolist() for n in lengths]


def test_batched_greedy_equals_batch_one(model):
    """Ragged prompts (some longer than a prefill chunk), each row crossing the local window at its
    own steps: tokens and log-probs identical to generating each prompt alone."""
    prompts = _prompts(model, [1, 3, 9, 17, 30, 60, 5, 2])
    options = dict(max_new_tokens=80, stop_at_eos=False, logprobs=True)
    alone = [model.sequence(tokens=p).generate(**options) for p in prompts]
    together = generate_batch(model, prompts, **options)
    for a, b in zip(alone, together):
        assert b.tokens == a.tokens
        assert b.logprobs == a.logprobs
        assert b.finish_reason == FinishReason.LENGTH and b.usage.prompt_tokens == a.usage.prompt_tokens


def test_rows_finish_independently(model):
    prompts = _prompts(model, [4, 7, 12, 5], seed=1)
    lengths = [3, 40, 1, 17]
    with Engine(model, EngineSettings(max_batch=4)) as engine:
        requests = [engine.submit(p, max_new_tokens=n, stop_at_eos=False) for p, n in zip(prompts, lengths)]
        results = [r.result(timeout=60) for r in requests]
    for prompt, n, result in zip(prompts, lengths, results):
        assert len(result.tokens) == n
        assert result.tokens == model.sequence(tokens=prompt).generate(max_new_tokens=n, stop_at_eos=False).tokens


def test_sampled_rows_follow_their_own_seeds(model):
    prompts = _prompts(model, [6, 6, 13], seed=2)
    options = [dict(temperature=0.9, seed=s, top_p=0.9) for s in (1, 2, 3)]
    alone = [model.sequence(tokens=p).generate(max_new_tokens=30, stop_at_eos=False, **o)
             for p, o in zip(prompts, options)]
    with Engine(model) as engine:
        requests = [engine.submit(p, max_new_tokens=30, stop_at_eos=False, **o) for p, o in zip(prompts, options)]
        assert [r.result(timeout=60).tokens for r in requests] == [a.tokens for a in alone]


def test_requests_from_many_threads_join_running_ones(model):
    """Requests arriving at different moments are merged into running batches (continuous
    batching) and still get exactly their batch-1 result."""
    prompts = _prompts(model, [3, 40, 8, 25, 2, 70, 11, 5, 33, 9], seed=3)
    expected = [model.sequence(tokens=p).generate(max_new_tokens=25, stop_at_eos=False).tokens for p in prompts]
    results: list = [None] * len(prompts)
    with Engine(model, EngineSettings(max_batch=4)) as engine:
        def client(i: int) -> None:
            time.sleep(0.002 * i)
            results[i] = engine.submit(prompts[i], max_new_tokens=25, stop_at_eos=False).result(timeout=60).tokens

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    assert results == expected
    assert stats.finished == len(prompts) and stats.tokens == 25 * len(prompts)
    assert stats.steps < stats.tokens  # steps were shared between rows


def test_a_full_queue_is_refused_clearly(model):
    with Engine(model, EngineSettings(max_batch=1, max_queue=2)) as engine:
        running = engine.submit("x", max_new_tokens=200, stop_at_eos=False)
        next(iter(running))  # it holds the only row now
        accepted = []
        with pytest.raises(QueueFullError, match="queue is full .2 requests waiting."):
            for _ in range(10):
                accepted.append(engine.submit("y", max_new_tokens=2, stop_at_eos=False))
        assert len(accepted) == 2
        running.cancel()
        for request in accepted:
            assert len(request.result(timeout=60).tokens) == 2


def test_cancel_one_request_leaves_the_others(model):
    prompts = _prompts(model, [5, 6, 7], seed=4)
    with Engine(model) as engine:
        requests = [engine.submit(p, max_new_tokens=150, stop_at_eos=False) for p in prompts]
        events = iter(requests[1])
        for _ in range(5):
            next(events)
        requests[1].cancel()
        cancelled = requests[1].result(timeout=60)
        others = [requests[0].result(timeout=60), requests[2].result(timeout=60)]
    assert cancelled.finish_reason == FinishReason.CANCELLED and 5 <= len(cancelled.tokens) < 150
    assert [len(o.tokens) for o in others] == [150, 150]


def test_a_long_prompt_does_not_starve_the_running_rows(packages):
    """While a long prompt is processed chunk by chunk, the running rows keep decoding: their
    tokens keep arriving between the chunks."""
    model = Model(packages[("context2048", "gqa")])
    with Engine(model, EngineSettings(max_batch=2)) as engine:
        running = engine.submit("x", max_new_tokens=300, stop_at_eos=False)
        events = iter(running)
        next(events)
        long = engine.submit(_prompts(model, [1500], seed=5)[0], max_new_tokens=2, stop_at_eos=False)
        consumed = 1
        while not long.done:
            next(events)
            consumed += 1
        # Tokens sent while the prompt ran, read or still queued: a reader slowed by a busy machine
        # falls behind the engine, and counting only what it read failed once in CI.
        sent = consumed + running._events.qsize()
        before = engine.stats()
        sum(1 for _ in events)
        result = long.result(timeout=60)
    chunks = -(-1500 // model.runner.chunk)
    # The running request got a token for (about) every chunk of the long prompt.
    assert sent - 1 >= chunks - 2
    assert len(result.tokens) == 2 and before.finished >= 1


def test_memory_stays_flat_over_many_requests(packages):
    from neoedge.bench import current_rss_mb

    model = Model(packages[("window8", "gqa")])
    with Engine(model, EngineSettings(max_batch=8)) as engine:
        def burst(n: int) -> None:
            requests = [engine.submit("Open the file", max_new_tokens=4, stop_at_eos=False) for _ in range(n)]
            for r in requests:
                r.result(timeout=60)

        burst(64)
        before = current_rss_mb()
        for _ in range(15):
            burst(64)
        after = current_rss_mb()
    assert after - before < 5, (before, after)  # 960 more requests, no growth beyond noise


def test_a_closed_engine_refuses_and_ends_its_requests(model):
    engine = Engine(model, EngineSettings(max_batch=1))
    running = engine.submit("x", max_new_tokens=200, stop_at_eos=False)
    waiting = engine.submit("y", max_new_tokens=200, stop_at_eos=False)
    engine.close()
    for request in (running, waiting):
        with pytest.raises(EngineClosedError):
            request.result(timeout=10)
    with pytest.raises(EngineClosedError):
        engine.submit("z")


def test_ragged_prompts_prefilled_together_equal_batch_one(model, monkeypatch):
    """Fresh prompts of different lengths go through one pass as long as they fit one chunk in all
    (each row's logits taken at its own last position), the rest one chunk at a time: still
    exactly the batch-1 result."""
    from neoedge import batch

    passes = []
    original = batch.GqaPool.prefill_fresh

    def counting(self, first, prompts):
        passes.append([len(p) for p in prompts])
        return original(self, first, prompts)

    monkeypatch.setattr(batch.GqaPool, "prefill_fresh", counting)
    prompts = _prompts(model, [3, 2, 5, 1, 4, 9, 14], seed=6)  # chunk 16: the first five together
    options = dict(max_new_tokens=12, stop_at_eos=False, logprobs=True)
    alone = [model.sequence(tokens=p).generate(**options) for p in prompts]
    with Engine(model, EngineSettings(max_batch=len(prompts))) as engine:
        with engine._cond:  # all queued before the worker admits any: they arrive together
            requests = [engine.submit(p, **options) for p in prompts]
        together = [r.result(timeout=60) for r in requests]
    assert [b.tokens for b in together] == [a.tokens for a in alone]
    assert [b.logprobs for b in together] == [a.logprobs for a in alone]
    if model.manifest.graph.attention == "gqa":
        assert passes == [[3, 2, 5, 1, 4]]


def test_asyncio_listeners_are_woken_once_per_engine_turn(packages):
    """Several requests followed on one asyncio loop get every event, in order, while the engine
    wakes the loop once per turn (a decode step's events together), not once per event."""
    import asyncio

    model = Model(packages[("window8", "gqa")])
    prompts = _prompts(model, [3, 5, 2, 7], seed=3)
    options = dict(max_new_tokens=10, stop_at_eos=False)
    alone = [list(model.sequence(tokens=p).generate(**options).tokens) for p in prompts]

    async def follow(engine: Engine) -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        async def tokens(request) -> list[int]:
            return [event.token async for event in request.events() if event.token is not None]

        with engine._cond:  # queued together: they run in the same steps
            requests = [engine.submit(p, **options) for p in prompts]
        return list(await asyncio.gather(*(tokens(r) for r in requests))), wakeups

    with Engine(model, EngineSettings(max_batch=len(prompts))) as engine:
        streamed, wakeups = asyncio.run(follow(engine))
        turns = engine.stats().steps + len(prompts)  # decode steps, plus at most a prefill turn each
    assert streamed == alone
    events = sum(len(t) for t in streamed) + len(prompts)  # tokens and each request's end
    assert wakeups <= turns < events


def test_a_listener_whose_loop_closed_cancels_its_request(model):
    """A consumer's loop closed without finishing its events: the engine stops that generation
    instead of generating for nobody."""
    import asyncio

    engine = Engine(model, EngineSettings(max_batch=1))
    try:
        request = engine.submit("x", max_new_tokens=100_000, stop_at_eos=False)
        loop = asyncio.new_event_loop()
        events = request.events()
        loop.run_until_complete(events.__anext__())
        loop.close()  # the generator stays suspended: nothing runs its finally
        completion = request.result(timeout=30)
        assert completion.finish_reason is FinishReason.CANCELLED
        assert len(completion.tokens) < 100_000
    finally:
        engine.close()


def test_a_request_has_one_reader_of_its_events(model):
    """A second reader (iterating again, or events() beside an iteration) is refused clearly instead
    of hanging or splitting the events; result() and result_async() work whoever read them."""
    import asyncio

    from neoedge.errors import RequestBusyError

    with Engine(model) as engine:
        request = engine.submit("hello", max_new_tokens=3, stop_at_eos=False)
        tokens = [e.token for e in request if e.token is not None]
        with pytest.raises(RequestBusyError, match="one reader"):
            iter(request)

        async def second():
            async for _ in request.events():
                pass

        with pytest.raises(RequestBusyError, match="one reader"):
            asyncio.run(second())
        assert asyncio.run(asyncio.wait_for(request.result_async(), 10)).tokens == tuple(tokens)
        assert request.result(timeout=0).tokens == tuple(tokens)

        async def read_then_await():
            other = engine.submit("hello", max_new_tokens=3, stop_at_eos=False)
            streamed = [e.token async for e in other.events() if e.token is not None]
            return streamed, await asyncio.wait_for(other.result_async(), 10)

        streamed, completion = asyncio.run(read_then_await())
        assert completion.tokens == tuple(streamed) == tuple(tokens)


def test_cancelling_a_waiting_request_ends_it_and_frees_its_place(model):
    """A request cancelled while it waits for a row ends at once (no tokens) and no longer counts
    against the queue's bound: a server's disconnected clients do not turn new ones away."""
    with Engine(model, EngineSettings(max_batch=1, max_queue=2)) as engine:
        running = engine.submit("a", max_new_tokens=100_000, stop_at_eos=False)
        try:
            _wait_until(lambda: engine.stats().active == 1)
            waiting = [engine.submit("b", max_new_tokens=5), engine.submit("c", max_new_tokens=5)]
            with pytest.raises(QueueFullError):
                engine.submit("d", max_new_tokens=5)
            for request in waiting:
                request.cancel()
            for request in waiting:
                completion = request.result(timeout=10)
                assert completion.finish_reason is FinishReason.CANCELLED and completion.tokens == ()
            engine.submit("e", max_new_tokens=5).cancel()  # the places are free again
            assert not running.done
        finally:
            running.cancel()


def test_a_cancel_token_shared_by_many_requests_holds_nothing_of_finished_ones(model):
    from neoedge import CancelToken

    token = CancelToken()
    with Engine(model) as engine:
        for _ in range(5):
            engine.submit("x", max_new_tokens=1, cancel=token).result(timeout=30)
    assert token._callbacks == []


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
