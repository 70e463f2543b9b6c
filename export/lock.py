"""One export at a time per OUT: a lock file beside OUT (`.OUT.neoedge-lock`), flock'ed for the
whole export. A second export to the same OUT fails at once instead of racing the first for OUT.

flock is on Linux, macOS and the BSDs (on NFS, Linux emulates it with fcntl locks); Windows uses
msvcrt.locking (untested: no Windows machine here). The lock file is removed when the export ends;
one left by a killed export is taken over by the next.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from neoedge.errors import ExportError

LOCK_SUFFIX = ".neoedge-lock"
LOCK_TEXT = "neoedge export lock\n"


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold OUT's lock file for the block; fail at once if another export holds it.

    The file is removed on release while still locked. A process that opened it before the removal
    then holds a lock on a deleted file, so after locking, the path must still name the locked file
    (else retry with the new one): two exports never both believe they hold the lock."""
    path = output.with_name(f".{output.name}{LOCK_SUFFIX}")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            raise ExportError(f"cannot create the export lock {path}: {exc.strerror or exc}") from exc
        try:
            if not _try_lock(fd):
                raise ExportError(f"another export to {output} is running (it holds {path}); "
                                  f"wait for it to finish or choose another output path")
            if not _same_file(fd, path):
                os.close(fd)
                continue
            content = os.read(fd, 256)
            if content not in (b"", LOCK_TEXT.encode()):
                raise ExportError(f"{path} exists and is not a neoedge export lock; move it away")
            if not content:
                os.write(fd, LOCK_TEXT.encode())
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # untested: no Windows machine here
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
