"""The file a saved sequence lives in: its tokens and its KV cache, bound to one package.

    magic "NEOEDGE-SEQUENCE\\n" | header length (8 bytes, little-endian) | JSON header | array bytes

The header names the package by a fingerprint of its files (so a state saved with one package is
refused by any other, even one of the same shape), lists every array's shape, dtype and place, and
carries the sha256 of the array bytes, so a truncated or altered file is refused rather than loaded
into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateFileError

MAGIC = b"NEOEDGE-SEQUENCE\n"
# 2: the checksum covers the header's fields (tokens, lengths, meta) as well as the cache arrays.
VERSION = 2
_VERSIONS = (1, 2)
_DTYPES = {"float32": np.float32, "int8": np.int8}
# A header larger than this is not one neoedge wrote (tokens of a 2,048 context fit in ~20 KB).
_MAX_HEADER = 1 << 22


@dataclass(frozen=True)
class SavedState:
    package: str
    tokens: list[int]
    processed: int
    length: int
    local_length: int
    arrays: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    """Whatever the owner of the sequence keeps with it (a conversation's turns), JSON."""


def write_state(path: str | os.PathLike[str], state: SavedState) -> None:
    entries, offset = [], 0
    digest = hashlib.sha256()
    for array in state.arrays:
        entries.append({"shape": list(array.shape), "dtype": array.dtype.name, "offset": offset,
                        "nbytes": int(array.nbytes)})
        offset += array.nbytes
    fields = {
        "format_version": VERSION, "package": state.package, "tokens": state.tokens,
        "processed": state.processed, "length": state.length, "local_length": state.local_length,
        "arrays": entries, "meta": state.meta,
    }
    digest.update(_canonical(fields))
    for array in state.arrays:
        digest.update(np.ascontiguousarray(array).data)
    header = json.dumps({**fields, "sha256": digest.hexdigest()}).encode("utf-8")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for array in state.arrays:
                f.write(np.ascontiguousarray(array).data)
        os.replace(tmp, path)  # a crash while saving never leaves a half-written state under the name
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateFileError(f"cannot save the sequence state to {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state(path: str | os.PathLike[str], package: str) -> SavedState:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise StateFileError(f"cannot read sequence state {path}: {exc.strerror or exc}") from exc
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise StateFileError(f"{path} is not a neoedge sequence state file")
    (size,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if size > _MAX_HEADER or start + size > len(data):
        raise StateFileError(f"sequence state {path} is truncated or corrupt (header)")
    try:
        header: dict[str, Any] = json.loads(data[start:start + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"sequence state {path} is corrupt (header: {exc})") from exc
    if not isinstance(header, dict) or header.get("format_version") not in _VERSIONS:
        raise StateFileError(f"sequence state {path} has an unsupported format version "
                             f"{header.get('format_version') if isinstance(header, dict) else '?'!r}")
    if header.get("package") != package:
        raise StateFileError(f"sequence state {path} was saved with another model package; "
                             "it can only be loaded by the package it came from")
    body = memoryview(data)[start + size:]
    try:
        arrays = []
        for entry in header["arrays"]:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
            if nbytes != int(np.prod(shape)) * np.dtype(dtype).itemsize or offset < 0 \
                    or offset + nbytes > len(body):
                raise StateFileError(f"sequence state {path} is truncated or corrupt (arrays)")
            arrays.append(np.frombuffer(body[offset: offset + nbytes], dtype=dtype).reshape(shape))
        tokens = header["tokens"]
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise StateFileError(f"sequence state {path} is corrupt (tokens)")
        saved = SavedState(package=package, tokens=tokens, processed=int(header["processed"]),
                           length=int(header["length"]), local_length=int(header["local_length"]),
                           arrays=arrays, meta=header.get("meta") if isinstance(header.get("meta"), dict) else {})
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"sequence state {path} is corrupt ({exc})") from exc
    digest = hashlib.sha256()
    if header["format_version"] >= 2:
        digest.update(_canonical({k: v for k, v in header.items() if k != "sha256"}))
    for array in arrays:
        digest.update(array.data)
    if digest.hexdigest() != header.get("sha256"):
        raise StateFileError(f"sequence state {path} is corrupt: its tokens or cache do not match its checksum")
    return saved


def _canonical(fields: dict[str, Any]) -> bytes:
    """The header's fields as the checksum covers them (independent of key order and spacing)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
