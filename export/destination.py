"""Where an export writes its package, and how it gets there without losing anything.

- OUT is written only if it does not exist, or if it is a neoedge package (its `neoedge.json` says
  format "neoedge-model-package" and the directory holds nothing but the files that manifest lists)
  and replacing it was asked for. Anything else at OUT (a folder of other files, an empty folder, a
  file, a symbolic link) is refused, replacing or not.
- One export at a time per OUT (export/lock.py), so that what this module finds beside OUT belongs
  to no live export.
- The package is built in a staging directory beside OUT (`.OUT.neoedge-XXXXXXXX.partial/package`,
  same filesystem, so the last step is a rename). The staging directory carries a marker file naming
  OUT; the next export to OUT (holding the lock, so no live export owns it) removes marked staging
  directories that an interrupted export left behind, and never a directory without the marker
  (except an empty one of exactly that name pattern, which holds nothing).
- The last step is atomic where the OS allows it:
  Linux (renameat2): a new OUT appears with RENAME_NOREPLACE, so a directory created at OUT while the
    export ran is never replaced; an old package is swapped with the new one by RENAME_EXCHANGE, so
    OUT always holds one complete package, then the old one (now in the staging directory) is removed.
  macOS (renamex_np): the same with RENAME_EXCL and RENAME_SWAP.
  Elsewhere, or on a filesystem that refuses those flags: a new OUT is renamed into place after a
    check that nothing is there (a rename never replaces a non-empty directory or a file, so at worst
    an empty directory created in that instant is replaced); an old package is moved aside into the
    staging directory and the new one moved in: two renames. A crash between them leaves OUT absent
    for an instant, with the old package in the staging directory, and the next export to OUT puts it
    back before doing anything else.
- Removing an old package deletes exactly the files its manifest lists, the manifest last, so an
  interrupted removal is finished by the next export; a package that has meanwhile gained other files
  is kept (and the export says where).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from neoedge.errors import ExportError
from neoedge.manifest import FORMAT_NAME, MANIFEST_NAME

log = logging.getLogger(__name__)

MARKER = ".neoedge-staging"  # inside a staging directory: {"staging_for": OUT's name, "phase": ...}
PACKAGE = "package"  # the package being built; after an exchange, the package that was at OUT
PREVIOUS = "previous"  # two-rename fallback only: the old package between the two renames


class OutputExistsError(ExportError):
    """OUT already holds a neoedge package and replacing it was not asked for."""

    def __init__(self, output: Path) -> None:
        super().__init__(f"{output} already holds a neoedge package; pass force=True to replace it")
        self.output = output


def output_path(output: str | os.PathLike[str]) -> Path:
    """OUT made absolute: its parent resolved as the OS resolves it (`link/../pkg` is beside the
    link's target, not beside the link), OUT itself not followed (it must not be a link)."""
    text = os.fsdecode(os.fspath(output))
    if "\0" in text:
        raise ExportError(f"{text!r} cannot hold a package: a path cannot contain a NUL character")
    given = Path(text)
    if given.name in ("", ".", ".."):
        raise ExportError(f"{output!s} cannot hold a package: choose a directory path to create")
    path = Path(os.path.realpath(given.parent)) / given.name
    if path == path.parent:
        raise ExportError(f"{output!s} cannot hold a package: choose a directory path to create")
    return path


def package_problem(path: Path) -> str | None:
    """None if `path` is a directory holding a neoedge package and nothing else; else what it is."""
    try:
        data = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME}"
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST_NAME} cannot be read ({exc})"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("files"), dict):
        return f"its {MANIFEST_NAME} is not a neoedge package manifest"
    listed = {str(name) for name in data["files"]} | {MANIFEST_NAME}
    try:
        others = sorted(entry.name for entry in os.scandir(path)
                        if entry.name not in listed or not entry.is_file(follow_symlinks=False))
    except OSError as exc:
        return f"it cannot be listed ({exc})"
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"it also holds {shown}, which its manifest does not list"
    return None


def check_output(output: Path, *, force: bool) -> bool:
    """Whether OUT holds a package to replace (False: OUT does not exist). Raises ExportError if OUT
    may not be written."""
    if not os.path.lexists(output):
        return False
    if output.is_symlink():
        raise ExportError(f"{output} is a symbolic link; an export writes only a new directory or over a "
                          f"neoedge package, never through a link: choose another output path")
    if not output.is_dir():
        raise ExportError(f"{output} exists and is not a directory; an export never replaces it: "
                          f"choose another output path")
    problem = package_problem(output)
    if problem is not None:
        raise ExportError(f"{output} exists and is not a neoedge package ({problem}); an export replaces "
                          f"only a neoedge package, so it leaves this alone: choose another output path")
    if not force:
        raise OutputExistsError(output)
    return True


# -- parents -------------------------------------------------------------------------------------
@contextlib.contextmanager
def parent_directories(output: Path) -> Iterator[None]:
    """Create OUT's missing parent directories; remove them again (if still empty) when the block fails."""
    missing = []
    parent = output.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
    except OSError as exc:
        _remove_empty(missing)
        raise ExportError(f"cannot create {output.parent}: {exc.strerror or exc}") from exc
    if not output.parent.is_dir():
        raise ExportError(f"cannot write {output}: {output.parent} is not a directory")
    try:
        yield
    except BaseException:
        _remove_empty(missing)
        raise


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# -- staging -------------------------------------------------------------------------------------
def _staging_pattern(output: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(output.name)}\.neoedge-[0-9a-f]{{8}}\.partial")


class Staging:
    """A marked directory beside OUT; the package is built in `self.package`."""

    def __init__(self, root: Path, output: Path) -> None:
        self.root, self.output = root, output
        self.package = root / PACKAGE

    @classmethod
    def create(cls, output: Path) -> Staging:
        for _ in range(100):
            root = output.with_name(f".{output.name}.neoedge-{secrets.token_hex(4)}.partial")
            try:
                os.mkdir(root, 0o700)
                break
            except FileExistsError:
                continue
            except OSError as exc:  # e.g. a name too long for the staging directory's suffix
                raise ExportError(f"cannot create a staging directory beside {output}: "
                                  f"{exc.strerror or exc}") from exc
        else:
            raise ExportError(f"cannot create a staging directory beside {output}")
        staging = cls(root, output)
        try:
            staging.set_phase("building")
            # Not mkdtemp: the package directory is created like any other (mode from the umask).
            os.mkdir(staging.package)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return staging

    def marker(self) -> dict | None:
        # An export killed between writing its first marker and renaming it into place leaves only
        # the ".new" one (a complete file, or none this can parse).
        name = MARKER if os.path.lexists(self.root / MARKER) else MARKER + ".new"
        try:
            data = json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("staging_for") != self.output.name:
            return None
        return data

    def set_phase(self, phase: str) -> None:
        # Written beside and renamed over the marker, so it is never half written.
        temporary = self.root / (MARKER + ".new")
        temporary.write_text(json.dumps({"staging_for": self.output.name, "phase": phase}), encoding="utf-8")
        os.replace(temporary, self.root / MARKER)

    def discard(self) -> None:
        """Remove the staging directory and what it holds: the export's own files, or the package that
        was replaced. Kept (unmarked, with a warning) if it holds anything else."""
        marker = self.marker()
        if marker is None:
            return
        previous = self.root / PREVIOUS
        if os.path.lexists(previous) and not os.path.lexists(self.output):
            # The two-rename fallback was interrupted between its renames: put the old package back.
            os.rename(previous, self.output)
            log.warning("restored the package at %s that an interrupted export had moved aside", self.output)
        for path in (self.package, previous):
            if not os.path.lexists(path):
                continue
            if path == self.package and marker.get("phase") == "building":
                shutil.rmtree(path)  # only what this export wrote
                continue
            problem = package_problem(path) if path.is_dir() and not path.is_symlink() else "not a directory"
            if problem is not None or not _remove_package(path):
                self._unmark()
                log.warning("kept %s (what was at %s before it was replaced): %s", path, self.output,
                            problem or "it gained files while it was being removed")
                return
        self._unmark()
        with contextlib.suppress(OSError):
            os.rmdir(self.root)

    def _unmark(self) -> None:
        """Remove the marker (and a first one never renamed into place): no longer staging."""
        for name in (MARKER + ".new", MARKER):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)


def _remove_package(path: Path) -> bool:
    """Delete the files a package's manifest lists, the manifest last (an interrupted removal leaves
    a smaller package, which the next export finishes removing). Anything else stays: False if the
    directory is not empty afterwards."""
    try:
        listed = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    for name in listed if isinstance(listed, dict) else ():
        file = path / name
        if name != MANIFEST_NAME and file.parent == path and file.is_file() and not file.is_symlink():
            os.unlink(file)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path / MANIFEST_NAME)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def remove_stale_staging(output: Path) -> None:
    """Remove what interrupted exports to OUT left beside it. Call only while holding OUT's lock."""
    pattern = _staging_pattern(output)
    for entry in os.scandir(output.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        staging = Staging(Path(entry.path), output)
        if staging.marker() is not None:
            log.info("removing %s, left by an interrupted export", entry.path)
            staging.discard()
        else:
            with contextlib.suppress(OSError):
                os.rmdir(entry.path)  # only if empty: an export killed before it marked the directory


# -- the last step -------------------------------------------------------------------------------
def publish(staging: Staging, *, replace: bool) -> None:
    """Move the finished package to OUT: new, or replacing the package there (atomically where the
    OS can). Raises ExportError, leaving OUT as it was, if OUT changed while the export ran."""
    output = staging.output
    if not replace:
        try:
            _rename_noreplace(staging.package, output)
        except FileExistsError:
            raise ExportError(f"{output} was created by something else while the export ran; it was left "
                              f"alone: export again to another path, or remove it first") from None
        return
    if not check_output(output, force=True):  # still a package? (it was when the export started)
        publish(staging, replace=False)  # removed meanwhile: nothing to replace
        return
    staging.set_phase("replacing")
    if _exchange(staging.package, output):
        # In the instant between the check and the exchange OUT could have been replaced by something
        # else; if so, swap it back untouched.
        problem = package_problem(staging.package)
        if problem is not None:
            _exchange(staging.package, output)
            staging.set_phase("building")
            raise ExportError(f"{output} changed while the export ran ({problem}); it was left alone")
        return
    # No atomic exchange here: two renames, the old package parked inside the marked staging dir.
    os.rename(output, staging.root / PREVIOUS)
    _rename_noreplace(staging.package, output)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if sys.platform != "win32" else None
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_RENAME_SWAP, _RENAME_EXCL = 0x2, 0x4  # macOS sys/stdio.h


def _atomic_rename(source: Path, target: Path, flag: str) -> bool:
    """rename with NOREPLACE or EXCHANGE semantics; False if this OS or filesystem cannot."""
    if _LIBC is None:
        return False
    if sys.platform.startswith("linux") and hasattr(_LIBC, "renameat2"):
        call = _LIBC.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        flags = _RENAME_NOREPLACE if flag == "noreplace" else _RENAME_EXCHANGE
        result = call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags)
    elif sys.platform == "darwin" and hasattr(_LIBC, "renamex_np"):  # untested: no macOS here
        call = _LIBC.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        flags = _RENAME_EXCL if flag == "noreplace" else _RENAME_SWAP
        result = call(os.fsencode(source), os.fsencode(target), flags)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this filesystem does not support the flag
    raise OSError(code, os.strerror(code), str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    if _atomic_rename(source, target, "noreplace"):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    # POSIX rename replaces only an empty directory; Windows' never replaces.
    os.rename(source, target)


def _exchange(a: Path, b: Path) -> bool:
    return _atomic_rename(a, b, "exchange")
