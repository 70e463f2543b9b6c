"""SIGTERM (and SIGHUP) during an export: clean up first, then end as the signal would have."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Make SIGTERM and SIGHUP (when they would simply kill the process) unwind the export first, so
    its staging directory and lock are removed, then die of the signal as before.

    An application's own handlers are left alone, and so are other threads (Python delivers signals
    to the main thread only). A signal that arrives during a long native call (a torch forward pass,
    onnxruntime building a session) takes effect when the call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            installed[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    except _Terminated as terminated:
        for signum, handler in installed.items():
            signal.signal(signum, handler)
        installed.clear()
        os.kill(os.getpid(), terminated.signum)
        raise SystemExit(128 + terminated.signum) from None  # if the signal did not end the process
    finally:
        for signum, handler in installed.items():
            signal.signal(signum, handler)


def _raise_terminated(signum: int, _frame: object) -> None:
    # A second signal must not interrupt the cleanup the first one starts.
    for other in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if other is not None and signal.getsignal(other) is _raise_terminated:
            signal.signal(other, signal.SIG_IGN)
    raise _Terminated(signum)
