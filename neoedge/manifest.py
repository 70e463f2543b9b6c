"""The model-package format: one directory, one manifest (`neoedge.json`), one schema.

The exporter writes this manifest and the runtime reads nothing else to learn the model's shape,
the graph's input/output names and how the package was quantized. It never needs Hugging Face code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import PackageError

MANIFEST_NAME = "neoedge.json"
FORMAT_NAME = "neoedge-model-package"
FORMAT_VERSION = 1

AttentionKind = Literal["global", "local"]
# "gqa": onnxruntime's GroupQueryAttention over a preallocated cache updated in place (fast path).
# "plain": standard ONNX ops, past concatenated inside the graph (portable reference/fallback).
AttentionImpl = Literal["gqa", "plain"]


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    context_length: int
    window_size: int
    attention_layers: tuple[AttentionKind, ...]
    bos_token_id: int
    eos_token_id: int
    source: str = ""

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class GraphInfo:
    """Names of the decoder graph's inputs and outputs.

    Per-layer cache names are templates with a `{layer}` field, resolved by `cache_pairs`.
    """

    file: str
    attention: AttentionImpl
    # Element type of the KV cache: "float32", or "int8" with calibrated per-channel scales (gqa only).
    kv_cache: Literal["float32", "int8"] = "float32"
    input_ids: str = "input_ids"
    position_ids: str = "position_ids"
    # Which positions get logits: the lm_head is the largest MatMul, so generation asks for one.
    logits_positions: str = "logits_positions"
    logits: str = "logits"
    past_key: str = "past_key.{layer}"
    past_value: str = "past_value.{layer}"
    present_key: str = "present_key.{layer}"
    present_value: str = "present_value.{layer}"
    # gqa only: index of the last valid cache position per batch row, and the total length.
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    # gqa only: the same for the local layers' bounded cache, which keeps only the recent window.
    local_seqlens_k: str = "local_seqlens_k"
    local_total_sequence_length: str = "local_total_sequence_length"

    def cache_pairs(self, layer: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """((past key, present key), (past value, present value)) input/output names of a layer."""
        return ((self.past_key.format(layer=layer), self.present_key.format(layer=layer)),
                (self.past_value.format(layer=layer), self.present_value.format(layer=layer)))


@dataclass(frozen=True)
class CalibrationInfo:
    """The text a quantized package's weights (and int8 KV cache scales) were calibrated on."""

    text: str  # "built-in: <file>" for the corpus that ships with neoedge, else the file's name
    sha256: str  # of the text's UTF-8 bytes
    sequences: int
    tokens_per_sequence: int


@dataclass(frozen=True)
class QuantizationSettings:
    """How a package's weights are quantized: MatMulNBits blocks, and how their codes were chosen."""

    bits: int
    block_size: int | tuple[int, ...]  # one size, or the sizes used where a default had to shrink
    lm_head_bits: int
    zero_point: Literal["symmetric", "asymmetric"]
    accuracy_level: int = 4
    # rtn (round-to-nearest), weighted-clip, awq or gptq (export/scheme.py); packages written
    # before this field existed are rtn.
    algorithm: str = "rtn"
    damping: float | None = None  # gptq
    act_order: bool | None = None  # gptq
    table_damping: float | None = None  # data-aware algorithms: the token lookup's share of the table's error
    calibration: CalibrationInfo | None = None
    method: str = "MatMulNBits"
    embedding: str = "tied, shared with lm_head"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationSettings:
        data = dict(data)
        if isinstance(data.get("block_size"), list):
            data["block_size"] = tuple(data["block_size"])
        if data.get("calibration") is not None:
            data["calibration"] = CalibrationInfo(**data["calibration"])
        return cls(**data)

    def describe(self) -> str:
        """One line, e.g. "4-bit MatMulNBits, block 128, symmetric, lm_head 4-bit, gptq (...)"."""
        blocks = self.block_size if isinstance(self.block_size, int) else "/".join(map(str, self.block_size))
        text = (f"{self.bits}-bit {self.method}, block {blocks}, {self.zero_point}, lm_head {self.lm_head_bits}-bit, "
                f"{self.algorithm}")
        details = [f"{name} {value}" for name, value in
                   (("damping", self.damping), ("act_order", self.act_order), ("table_damping", self.table_damping))
                   if value is not None]
        if self.calibration is not None:
            c = self.calibration
            details.append(f"calibrated on {c.sequences}x{c.tokens_per_sequence} tokens of {c.text}")
        return text + (f" ({', '.join(details)})" if details else "")


@dataclass(frozen=True)
class Quantization:
    scheme: Literal["none", "int8", "int4"] = "none"
    settings: QuantizationSettings | None = None  # None for fp32

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quantization:
        if not isinstance(data, dict) or not isinstance(data.get("settings") or {}, dict):
            raise TypeError("quantization and its settings must be objects")
        settings = data.get("settings") or None  # fp32 packages have written {}
        return cls(scheme=data.get("scheme", "none"),
                   settings=QuantizationSettings.from_dict(settings) if settings is not None else None)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    graph: GraphInfo
    quantization: Quantization
    files: dict[str, FileEntry]
    generation: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "tokenizer.json"
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"]["attention_layers"] = list(self.model.attention_layers)
        return {"format": FORMAT_NAME, **data}

    def write(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise PackageError(f"not a neoedge model package manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(
                f"unsupported package format_version {version!r}: this neoedge reads version "
                f"{FORMAT_VERSION}; re-export the model with this version of neoedge"
            )
        try:
            model = dict(data["model"])
            model["attention_layers"] = tuple(model["attention_layers"])
            manifest = cls(
                model=ModelInfo(**model),
                graph=GraphInfo(**data["graph"]),
                quantization=Quantization.from_dict(data.get("quantization", {})),
                files={name: FileEntry(**entry) for name, entry in data["files"].items()},
                generation=dict(data.get("generation", {})),
                validation=dict(data.get("validation", {})),
                tokenizer=data.get("tokenizer", "tokenizer.json"),
                created_by=data.get("created_by", ""),
                format_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise PackageError(f"malformed manifest: {exc}") from exc
        manifest._check()
        return manifest

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        directory = Path(directory)
        if not directory.is_dir():
            raise PackageError(f"model package not found: {directory} is not a directory")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise PackageError(f"{directory} is not a neoedge model package: {MANIFEST_NAME} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"corrupt manifest {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise PackageError(f"corrupt manifest {path}: expected a JSON object")
        return cls.from_dict(data)

    def _check(self) -> None:
        m = self.model
        if len(m.attention_layers) != m.num_layers:
            raise PackageError("malformed manifest: attention_layers does not list every layer")
        if m.hidden_size % m.num_heads:
            raise PackageError("malformed manifest: hidden_size is not a multiple of num_heads")
        for name in (self.graph.file, self.tokenizer):
            if name not in self.files:
                raise PackageError(f"malformed manifest: {name} is not listed in files")

    # -- integrity ----------------------------------------------------------------------------
    def check_files(self, directory: str | os.PathLike[str], *, verify_hashes: bool = False) -> None:
        """Raise PackageError if a listed file is missing, truncated, or (optionally) altered.

        Sizes are always checked (free); hashing reads every byte, so it is opt-in.
        """
        directory = Path(directory)
        for name, entry in self.files.items():
            path = directory / name
            if not path.is_file():
                raise PackageError(f"model package {directory} is incomplete: {name} is missing")
            size = path.stat().st_size
            if size != entry.bytes:
                raise PackageError(
                    f"model package file {name} is corrupt: {size} bytes, manifest says {entry.bytes}"
                )
            if verify_hashes and sha256_file(path) != entry.sha256:
                raise PackageError(f"model package file {name} is corrupt: sha256 does not match")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: str | os.PathLike[str]) -> dict[str, FileEntry]:
    """Hash every file of a package directory (the manifest itself excluded)."""
    directory = Path(directory)
    return {
        path.name: FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }


def worst_validation_error(measures: dict[str, Any], prefix: str) -> float:
    """The larger of a validation report's prefill and step-wise figures, `prefix`_prefill and
    `prefix`_stepwise (e.g. "max_abs_logit_diff", or "max_abs_error" in its float64 part)."""
    return max(measures[f"{prefix}_prefill"], measures[f"{prefix}_stepwise"])
