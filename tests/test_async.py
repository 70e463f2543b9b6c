"""asyncio: the same events as the threaded API, the loop stays free, task.cancel() cancels."""

from __future__ import annotations

import asyncio

import pytest

from neoedge import FinishReason, Model


@pytest.fixture(scope="module")
def model(package) -> Model:
    return Model(package)


def test_async_stream_equals_the_sync_one(model):
    expected = model.generate("Open the", max_new_tokens=30, stop_at_eos=False)

    async def main():
        events = [e async for e in model.astream("Open the", max_new_tokens=30, stop_at_eos=False)]
        completion = await model.agenerate("Open the", max_new_tokens=30, stop_at_eos=False)
        return events, completion

    events, completion = asyncio.run(main())
    assert "".join(e.text for e in events) == expected.text
    assert completion.tokens == expected.tokens and completion.finish_reason == FinishReason.LENGTH


def test_generation_never_blocks_the_event_loop(model):
    async def main():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        completion = await model.sequence("x").agenerate(max_new_tokens=200, stop_at_eos=False)
        done = True
        await task
        return ticks, completion

    ticks, completion = asyncio.run(main())
    assert completion.usage.new_tokens == 200
    # The loop ran the ticker about once per event handed over (and more): far more than once.
    assert ticks >= 100


def test_cancelling_the_task_cancels_the_generation_and_frees_the_sequence(model):
    seq = model.sequence("Open the file")

    async def main():
        seen = []

        async def consume():
            async for event in seq.astream(max_new_tokens=200, stop_at_eos=False):
                seen.append(event)
                if len(seen) == 3:
                    task.cancel()  # delivered at the next await: waiting for the next event

        task = asyncio.create_task(consume())
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 3
    # Free at once, holding what was made: the 3 seen, and the few the worker may make ahead (AHEAD).
    from neoedge.aio import AHEAD

    generated = len(seq) - len(model.encode("Open the file"))
    assert 3 <= generated <= 3 + AHEAD + 1
    assert seq.generate(max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2


def test_a_task_cancelled_in_its_own_body_still_stops_the_generation(model):
    seq = model.sequence("Open the file")

    async def main():
        async def consume():
            async for _ in seq.astream(max_new_tokens=500, stop_at_eos=False):
                await asyncio.sleep(0.001)  # cancellation lands here, outside the stream

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the worker stops within a forward pass of the cancel
            if seq._guard.acquire(blocking=False):
                seq._guard.release()
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the generation went on after its task was cancelled")

    asyncio.run(main())
    assert len(seq) < len(model.encode("Open the file")) + 500


def test_a_long_lived_task_keeps_none_of_the_generations_it_awaited(model):
    """A task (a server's, an app's main loop) that awaits generation after generation holds none
    of their sequences or KV caches once they are done."""
    import gc

    from neoedge.sequence import Sequence

    async def alive_after(count: int) -> int:
        for _ in range(count):
            await model.agenerate("Open the", max_new_tokens=2, stop_at_eos=False)
        await asyncio.sleep(0.05)  # the last worker thread hands back its sequence
        gc.collect()
        return sum(isinstance(o, Sequence) for o in gc.get_objects())

    async def main():
        return await alive_after(2), await alive_after(10)

    few, many = asyncio.run(main())
    assert many <= few


def test_a_finished_stream_iterated_again_ends_at_once(model):
    async def main():
        stream = model.astream("Open the", max_new_tokens=3, stop_at_eos=False)
        events = [e async for e in stream]
        again = [e async for e in stream]
        return events, again, await asyncio.wait_for(stream.run(), 10)

    events, again, completion = asyncio.run(main())
    assert again == [] and len(completion.tokens) == 3 == len([e for e in events if e.token is not None])
