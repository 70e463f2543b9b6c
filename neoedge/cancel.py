"""A cancel handle that any thread can trigger, and that reaches into a running forward pass."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CancelToken:
    """Thread-safe: `cancel()` from any thread stops the generation (or prefill) it was given to.

    Between forward passes the generation loop checks `cancelled`. A forward pass in flight is cut
    short too: the runner registers its onnxruntime RunOptions here, and cancelling sets their
    `terminate` flag, which onnxruntime checks between nodes. So a long prompt stops within one node,
    not at the end of its chunk.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when cancelled (at once if already). Returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def remove() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)
                return remove
        callback()
        return lambda: None

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"
