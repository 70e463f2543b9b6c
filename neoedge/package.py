"""A model package on disk: opening it, the closed-package rules, and the integrity of its bytes.

Opening a package checks, before anything else reads a byte of it:
- the manifest: strictly parsed, and its seal (the sha256 of its own bytes) matches;
- every path stays inside the package: every name the manifest lists (the graph and the tokenizer
  among them) resolves, symlinks followed, to a regular file inside the package directory;
- every file listed has the size the manifest records;
- the graph file's sha256 (it is small, and onnxruntime is about to parse it), and every file the
  graph reads as external data is one the manifest lists (so it is hashed too), at offsets inside it.

Every other listed file — the weights, the tokenizer — is hashed in a background thread while the
caller builds the onnxruntime session (`opening_package`), and the load does not return before
every hash matched. hashlib and file reads release the GIL, so on two cores this costs little of
the cold start. A file whose hash matched once is remembered by a *verified stamp* in the user's
cache directory (never inside the package): its device, inode, size, mtime and ctime. Any write to
a file changes its mtime and ctime, so a later load skips re-hashing only files that have not been
written since. verify="full" re-hashes every byte whatever the stamps say.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import GraphMismatchError, IntegrityError, OptionsError, PackagePathError
from .graph_file import GraphFile, read_graph_file
from .manifest import MANIFEST_NAME, FileEntry, Manifest, check_package_path, read_manifest_bytes

log = logging.getLogger(__name__)

VerifyMode = Literal["auto", "full"]
"""auto: hash every file, except one a verified stamp shows unchanged since it was hashed;
full: hash every file."""

CACHE_ENV = "NEOEDGE_CACHE_DIR"
"""Where verified stamps live (default: the user's cache directory + /neoedge); empty: no stamps."""

# A file changed within this long before it was hashed may change again without its timestamps
# showing it (they tick in jiffies, or in 2 s on FAT): such a file is hashed, but not stamped.
RACY_SECONDS = 2.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Package:
    """An opened package: its resolved directory, its manifest and what its graph file holds."""

    root: Path
    manifest: Manifest
    graph: GraphFile
    kernel_graph: GraphFile | None = None
    """The graph with neoedge's native kernels (manifest graph.kernel_file), if the package has one."""
    tiled_kernel_graph: GraphFile | None = None
    """The kernel graph with its weights stored tiled (graph.tiled_kernel_file), if written."""

    def path(self, name: str) -> Path:
        """The path of a file the manifest lists (already checked to be inside the package)."""
        if name not in self.manifest.files:
            raise PackagePathError(f"{name} is not a file of the package {self.root}")
        return self.root / name

    @property
    def graph_path(self) -> Path:
        return self.path(self.manifest.graph.file)

    @property
    def kernel_graph_path(self) -> Path | None:
        name = self.manifest.graph.kernel_file
        return None if name is None else self.path(name)

    @property
    def tiled_kernel_graph_path(self) -> Path | None:
        name = self.manifest.graph.tiled_kernel_file
        return None if name is None else self.path(name)

    def graph_at(self, path: Path) -> GraphFile:
        """The graph file (parsed) of the session made from `path`, one of the package's graphs."""
        for name, graph in ((self.manifest.graph.file, self.graph),
                            (self.manifest.graph.tiled_kernel_file, self.tiled_kernel_graph),
                            (self.manifest.graph.kernel_file, self.kernel_graph)):
            if name is not None and graph is not None and Path(path) == self.path(name):
                return graph
        raise PackagePathError(f"{path} is not a graph of the package {self.root}")

    @property
    def tokenizer_path(self) -> Path:
        return self.path(self.manifest.tokenizer)


def open_package(directory: str | os.PathLike[str], *, verify: VerifyMode = "auto") -> Package:
    """Open and fully check a package (see the module's docstring); nothing is loaded."""
    with opening_package(directory, verify=verify) as package:
        return package


@contextmanager
def opening_package(directory: str | os.PathLike[str], *, verify: VerifyMode = "auto") -> Iterator[Package]:
    """Open a package, leaving the hashing of its large files to a background thread while the
    `with` block loads it; leaving the block waits for the hashes and raises IntegrityError if one
    does not match. An integrity failure takes precedence over an error raised inside the block
    (a corrupt file is the likelier cause of both)."""
    if verify not in ("auto", "full"):
        raise OptionsError(f"verify must be 'auto' or 'full' (checking cannot be turned off), got {verify!r}")
    package, pending = _open(Path(directory))
    hasher = _Hasher(package.root, pending, stamps=Stamps.default(), use_stamps=verify == "auto")
    hasher.start()
    try:
        yield package
    except Exception as exc:
        failure = hasher.result()
        if failure is not None:
            raise failure from exc
        raise
    except BaseException:  # KeyboardInterrupt: stop hashing now
        hasher.cancel()
        raise
    failure = hasher.result()
    if failure is not None:
        raise failure


# -- the synchronous checks -------------------------------------------------------------------------
def _open(directory: Path) -> tuple[Package, list[tuple[str, Path, FileEntry]]]:
    try:
        if not directory.is_dir():
            raise IntegrityError(f"model package not found: {directory} is not a directory")
        root = directory.resolve(strict=True)
    except OSError as exc:
        raise IntegrityError(f"cannot open the model package {directory}: {exc.strerror}") from None
    try:  # onnxruntime takes file names as UTF-8 strings: a path in another encoding cannot reach it
        str(root).encode("utf-8")
    except UnicodeEncodeError:
        raise PackagePathError(f"the model package's path {str(root)!r} is not valid UTF-8, which onnxruntime "
                               "needs: rename it or a directory above it") from None
    manifest_path = _inside(root, MANIFEST_NAME, "the manifest")
    manifest = Manifest.from_json(read_manifest_bytes(manifest_path), source=f"manifest {directory / MANIFEST_NAME}")
    paths = {name: _inside(root, name, "files entry") for name in manifest.files}
    for name, path in paths.items():
        _check_size(directory, name, path, manifest.files[name])
    # Graph files are small and onnxruntime is about to parse one: they are hashed before anything reads them.
    graphs: dict[str, GraphFile] = {}
    for graph_name in filter(None, (manifest.graph.file, manifest.graph.kernel_file, manifest.graph.tiled_kernel_file)):
        graph_bytes = _read_verified(directory, graph_name, paths[graph_name], manifest.files[graph_name])
        graphs[graph_name] = read_graph_file(graph_bytes, graph_name)
        _check_external_data(graphs[graph_name], manifest, graph_name)
    pending = [(name, paths[name], manifest.files[name]) for name in manifest.files if name not in graphs]
    kernel_graph = graphs.get(manifest.graph.kernel_file) if manifest.graph.kernel_file else None
    tiled = graphs.get(manifest.graph.tiled_kernel_file) if manifest.graph.tiled_kernel_file else None
    return Package(root=root, manifest=manifest, graph=graphs[manifest.graph.file], kernel_graph=kernel_graph,
                   tiled_kernel_graph=tiled), pending


def _inside(root: Path, name: str, what: str) -> Path:
    """root/name with every symlink resolved, if it stays inside root; the error never says
    anything about what lies outside (not even whether it exists)."""
    try:
        resolved = (root / name).resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise PackagePathError(f"{what} {name} is a symlink loop") from None
    if not resolved.is_relative_to(root):
        raise PackagePathError(f"{what} {name} leads outside the package {root} (through a symlink)")
    return resolved


def _check_size(directory: Path, name: str, path: Path, entry: FileEntry) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IntegrityError(f"model package {directory} is incomplete: {name} is missing") from None
    except OSError as exc:
        raise IntegrityError(f"model package file {name} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise IntegrityError(f"model package file {name} is not a regular file")
    if info.st_size != entry.bytes:
        raise IntegrityError(f"model package file {name} is corrupt: {info.st_size} bytes, manifest "
                             f"says {entry.bytes}")


def _read_verified(directory: Path, name: str, path: Path, entry: FileEntry) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(entry.bytes + 1)
    except OSError as exc:
        raise IntegrityError(f"model package file {name} cannot be read: {exc.strerror}") from None
    if len(data) != entry.bytes:
        raise IntegrityError(f"model package file {name} is corrupt: {len(data)} bytes, manifest says "
                             f"{entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"model package file {name} is corrupt: sha256 does not match")
    return data


def _check_external_data(graph: GraphFile, manifest: Manifest, graph_name: str) -> None:
    """Every file the graph reads beside it is one the manifest lists, read within its size."""
    parent = graph_name.rpartition("/")[0]
    checked: dict[str, str] = {}  # location -> package file (hundreds of tensors share one)
    for entry in graph.external_data:
        name = checked.get(entry.location)
        if name is None:
            # onnxruntime resolves a location against the graph file's directory.
            location = check_package_path(entry.location, f"{graph_name}'s external data location for "
                                                          f"{entry.tensor!r}:")
            name = f"{parent}/{location}" if parent else location
            if name not in manifest.files:
                raise PackagePathError(f"{graph_name} reads its tensor {entry.tensor!r} from {name}, which "
                                       "the manifest does not list (so it could not be checked)")
            if name == graph_name:
                raise PackagePathError(f"{graph_name} names itself as the external data of {entry.tensor!r}")
            checked[entry.location] = name
        size = manifest.files[name].bytes
        end = entry.offset + (entry.length or 0)
        if end > size:
            raise GraphMismatchError(f"{graph_name} reads {entry.tensor!r} from bytes {entry.offset}-{end} "
                                     f"of {name}, which has {size}")


# -- background hashing -------------------------------------------------------------------------------
class _Hasher(threading.Thread):
    """Hashes files one after another; stops at the first mismatch (kept in `failure`)."""

    def __init__(self, root: Path, files: list[tuple[str, Path, FileEntry]], *, stamps: Stamps | None,
                 use_stamps: bool) -> None:
        super().__init__(name="neoedge-verify", daemon=True)
        self._root = root
        # Largest first: it takes longest, and runs beside the session build that reads it.
        self._files = sorted(files, key=lambda item: -item[2].bytes)
        self._stamps = stamps
        self._use_stamps = use_stamps
        self._cancelled = threading.Event()
        self.failure: IntegrityError | None = None
        self.completed = False

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self) -> None:
        for name, path, entry in self._files:
            try:
                self._verify(name, path, entry)
            except IntegrityError as exc:
                self.failure = exc
                return
            except OSError as exc:
                self.failure = IntegrityError(f"model package file {name} cannot be read: {exc.strerror}")
                return
            except BaseException as exc:  # whatever happens here, the load must not pass unverified
                self.failure = IntegrityError(f"model package file {name} could not be verified: {exc!r}")
                return
            if self._cancelled.is_set():
                return
        self.completed = True

    def result(self) -> IntegrityError | None:
        """Wait for the hashes; the failure, if any."""
        self.join()
        if self.failure is None and not self.completed:
            return IntegrityError(f"the files of {self._root} were not all verified")
        return self.failure

    def _verify(self, name: str, path: Path, entry: FileEntry) -> None:
        if self._use_stamps and self._stamps is not None and self._stamps.verified(path, entry.sha256):
            log.debug("%s: unchanged since verified (stamp)", name)
            return
        started = time.time()
        digest = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as f:
            before = os.fstat(f.fileno())
            if not stat.S_ISREG(before.st_mode) or before.st_size != entry.bytes:
                raise IntegrityError(f"model package file {name} is corrupt: {before.st_size} bytes, "
                                     f"manifest says {entry.bytes}")
            while count := f.readinto(buffer):
                digest.update(view[:count])
                if self._cancelled.is_set():
                    return
            after = os.fstat(f.fileno())
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"model package file {name} is corrupt: sha256 does not match")
        if self._stamps is not None and _identity(before) == _identity(after) \
                and max(after.st_mtime_ns, after.st_ctime_ns) < (started - RACY_SECONDS) * 1e9:
            self._stamps.record(path, after, entry.sha256)


# -- verified stamps ----------------------------------------------------------------------------------
def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class Stamps:
    """Verified stamps: for a file path, the identity it had when its bytes were found to have a
    sha256. One small JSON file per package file, named by the hash of its path, so the cache holds
    one stamp per file ever loaded and a re-export simply replaces it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def default(cls) -> Stamps | None:
        configured = os.environ.get(CACHE_ENV)
        if configured is not None:
            return cls(Path(configured) / "verified") if configured else None
        if sys.platform == "win32":
            base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        elif sys.platform == "darwin":
            base = Path.home() / "Library" / "Caches"
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(base / "neoedge" / "verified")

    def _file(self, path: Path) -> Path:
        return self.directory / (hashlib.sha256(os.fsencode(path)).hexdigest()[:40] + ".json")

    def verified(self, path: Path, sha256: str) -> bool:
        """Whether `path` is, by its identity, the very file a stamp says had this sha256."""
        try:
            stamp = json.loads(self._file(path).read_text(encoding="utf-8"))
            info = os.stat(path)
        except (OSError, ValueError):
            return False
        return (isinstance(stamp, dict) and stamp.get("path") == os.fsdecode(path)
                and stamp.get("sha256") == sha256 and stamp.get("identity") == list(_identity(info)))

    def record(self, path: Path, info: os.stat_result, sha256: str) -> None:
        """Remember that `path`, with this identity, has this sha256. A cache that cannot be written
        (read-only home, full disk) only means the next load hashes again."""
        target = self._file(path)
        data = json.dumps({"path": os.fsdecode(path), "sha256": sha256, "identity": list(_identity(info))})
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary.write_text(data, encoding="utf-8")
            os.replace(temporary, target)
        except OSError as exc:
            log.debug("cannot record a verified stamp in %s: %s", self.directory, exc)
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass
