"""asyncio counterparts of streaming and whole-text generation.

The model runs in a worker thread, one per generation, never on the event loop; events cross to the
loop through `call_soon_threadsafe`. Cancelling the task that awaits a stream cancels the
generation (within one forward pass), and the task ends only once the sequence is free again.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .events import Completion, TokenEvent
from .generation import Stream

_END = object()
# Events the worker may produce ahead of the consumer: enough to overlap the next step with the
# consumer's work, few enough that a slow consumer (or a cancel) never finds a pile of made tokens.
AHEAD = 2


class AsyncStream:
    """`async for event in stream` over a generation; `await stream.run()` for the whole result."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[Any] | None = None
        self._done: asyncio.Future[None] | None = None
        self._room = threading.Semaphore(AHEAD)
        self._ended = False  # the end (or the error) was handed out: iterating again ends at once
        self._error: BaseException | None = None

    @property
    def completion(self) -> Completion | None:
        return self._stream.completion

    def cancel(self) -> None:
        """Stop the generation (thread-safe, like Stream.cancel)."""
        self._stream.cancel()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> TokenEvent:
        if self._ended:
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        if self._queue is None:
            self._start()
        assert self._queue is not None
        try:
            # Always suspend once: a cancel requested while the consumer ran is delivered here, inside
            # the stream (which then stops the generation), even when an event is already waiting.
            await asyncio.sleep(0)
            item = await self._queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        self._room.release()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended, self._error = True, item
            raise item
        return item

    async def run(self) -> Completion:
        async for _ in self:
            pass
        completion = self._stream.completion
        assert completion is not None
        return completion

    async def aclose(self) -> None:
        """Cancel if still running and wait (without blocking the loop) until the worker is done."""
        if self._done is None:
            self._stream.close()
            return
        self._stream.cancel()
        await asyncio.shield(self._done)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._done = loop.create_future()
        task = asyncio.current_task()
        token = self._stream.cancel_token

        def cancel_with_task(_: Any) -> None:
            token.cancel()

        if task is not None:
            # However the consuming task ends (cancelled in its own body, an exception, abandoned),
            # the generation does not outlive it. The callback holds the token only, and is removed
            # when the generation ends: a long-lived task would otherwise keep every stream it
            # awaited, with its sequence and KV cache, alive.
            task.add_done_callback(cancel_with_task)
        queue, done, stream, room = self._queue, self._done, self._stream, self._room

        def finished() -> None:  # on the loop
            if task is not None:
                task.remove_done_callback(cancel_with_task)
            if not done.done():
                done.set_result(None)

        def send(item: Any) -> None:
            while not room.acquire(timeout=0.05):
                if stream.cancel_token.cancelled:
                    break  # the consumer left: nobody will take this event
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stream.cancel()

        def work() -> None:
            try:
                for event in stream:
                    send(event)
                send(_END)
            except BaseException as exc:  # handed to the awaiting task, raised there
                send(exc)
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:
                    pass

        threading.Thread(target=work, name="neoedge-generation", daemon=True).start()
