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
class Quantization:
    scheme: Literal["none", "int8", "int4"] = "none"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


def _worse(a: float, b: float) -> float:
    """The larger of two figures, NaN if either is (a NaN must never pass a bound)."""
    return a if a != a or a >= b else b


@dataclass(frozen=True)
class Float64Check:
    """An fp32 package beyond the tolerance, judged against the exact (float64) logits instead: it
    passes if it is no further from them than `margin` × transformers' own fp32 error."""

    max_abs_error_transformers: float
    max_abs_error_prefill: float
    max_abs_error_stepwise: float
    margin: float

    @property
    def max_abs_error(self) -> float:
        return _worse(self.max_abs_error_prefill, self.max_abs_error_stepwise)

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.margin * self.max_abs_error_transformers


@dataclass(frozen=True)
class QualityCheck:
    """A package that is not exact (quantized weights or KV cache), judged by how far its logits are
    from the reference's, within the bounds of its precision (`bounds`: "int8" or "int4").

    Figures are the worse of the prefill and the step-wise pass; agreement is counted where the
    reference is decisive. A reference with too few decisive positions (random weights: nearly
    uniform predictions everywhere) has no quality to lose, and tiny weight errors are amplified
    chaotically in large random models: it is judged only by the correlation of the logits, and the
    other limits are None (not applied)."""

    bounds: str
    decisive_positions: int
    mean_kl: float  # nats, KL(reference || package), mean over positions
    relative_error: float  # rms of the centred logit error / rms of the centred reference logits
    correlation: float  # of the centred logits, package and reference
    decisive_agreement: float | None  # top-1 agreement at the decisive positions
    min_correlation: float
    max_mean_kl: float | None = None
    max_relative_error: float | None = None
    min_decisive_agreement: float | None = None

    @property
    def problems(self) -> list[str]:
        found = []
        if not self.correlation >= self.min_correlation:
            found.append(f"logit correlation {self.correlation:.3g} < {self.min_correlation:g}")
        if self.max_mean_kl is not None and not self.mean_kl <= self.max_mean_kl:
            found.append(f"mean KL {self.mean_kl:.3g} nats > {self.max_mean_kl:g}")
        if self.max_relative_error is not None and not self.relative_error <= self.max_relative_error:
            found.append(f"relative logit error {self.relative_error:.3g} > {self.max_relative_error:g}")
        if self.min_decisive_agreement is not None and self.decisive_agreement is not None \
                and not self.decisive_agreement >= self.min_decisive_agreement:
            found.append(f"top-1 agreement {self.decisive_agreement:.1%} < {self.min_decisive_agreement:.0%} "
                         f"where the reference is decisive")
        return found


@dataclass(frozen=True)
class ValidationReport:
    """What the export measured of the written package against transformers' GPTNeoForCausalLM,
    over `positions` tokens: the prefill at every position, then `decode_steps` cached steps."""

    positions: int
    window_size: int
    decode_steps: int
    max_abs_logit_diff_prefill: float
    max_abs_logit_diff_stepwise: float
    top1_agreement: float
    # None only in packages of an older neoedge, which recorded quantized packages without judging them.
    passed: bool | None = None
    tolerance: float | None = None  # exact (fp32) packages: the bound on max |Δlogit|
    float64: Float64Check | None = None
    quality: QualityCheck | None = None

    @property
    def max_abs_logit_diff(self) -> float:
        return _worse(self.max_abs_logit_diff_prefill, self.max_abs_logit_diff_stepwise)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        data = dict(data)
        if data.get("float64"):
            data["float64"] = Float64Check(**data["float64"])
        if data.get("quality"):
            data["quality"] = QualityCheck(**data["quality"])
        return cls(**data)

    @property
    def problems(self) -> list[str]:
        """Why the package failed (empty if it did not)."""
        if self.passed is not False:
            return []
        if self.quality is not None:
            return self.quality.problems
        found = []
        if self.tolerance is not None and not self.max_abs_logit_diff <= self.tolerance:
            found.append(f"the logits differ from transformers' by {self.max_abs_logit_diff:.3g} "
                         f"(tolerance {self.tolerance:g})")
        if self.float64 is not None and not self.float64.passed:
            found.append(f"and from the exact float64 logits by {self.float64.max_abs_error:.3g}, more than "
                         f"{self.float64.margin:g}× transformers' own fp32 error "
                         f"({self.float64.max_abs_error_transformers:.3g})")
        return found

    def lines(self) -> list[str]:
        """The report in words: what `neoedge export` prints and `neoedge info` shows."""
        lines = [f"against transformers over {self.positions} positions ({self.decode_steps} decoded "
                 f"step-wise): max |Δlogit| prefill {self.max_abs_logit_diff_prefill:.2e}, step-wise "
                 f"{self.max_abs_logit_diff_stepwise:.2e}; top-1 agreement {self.top1_agreement:.1%}"]
        if self.float64 is not None:
            f = self.float64
            lines.append(f"beyond the {self.tolerance:g} tolerance, so checked against float64 logits: max "
                         f"error {f.max_abs_error:.2e}, transformers' own fp32 {f.max_abs_error_transformers:.2e} "
                         f"(allowed: {f.margin:g}×)")
        elif self.tolerance is not None:
            lines.append(f"exact (fp32): the tolerance is {self.tolerance:g}")
        if self.quality is not None:
            q = self.quality
            if q.max_mean_kl is None:
                lines.append(f"{q.bounds} bounds, a model without decisive predictions ({q.decisive_positions} "
                             f"positions; random weights?), judged by logit correlation only: {q.correlation:.3f} "
                             f"(>= {q.min_correlation:g}); mean KL {q.mean_kl:.2e} nats, relative logit error "
                             f"{q.relative_error:.3f}")
            else:
                agreement = (f"{q.decisive_agreement:.1%} at {q.decisive_positions} decisive positions "
                             f"(>= {q.min_decisive_agreement:.0%})")
                lines.append(f"{q.bounds} bounds: mean KL {q.mean_kl:.2e} nats (<= {q.max_mean_kl:g}), relative "
                             f"logit error {q.relative_error:.3f} (<= {q.max_relative_error:g}), top-1 agreement "
                             f"{agreement}, logit correlation {q.correlation:.4f} (>= {q.min_correlation:g})")
        if self.passed is None:
            lines.append("not judged (exported by an older neoedge)")
        elif not self.passed:
            lines.append("FAILED: " + ", ".join(self.problems))
        return lines


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    graph: GraphInfo
    quantization: Quantization
    files: dict[str, FileEntry]
    generation: dict[str, Any] = field(default_factory=dict)
    validation: ValidationReport | None = None
    # What the export decided that was not asked for (e.g. the plain attention fallback), in words.
    notes: tuple[str, ...] = ()
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
                quantization=Quantization(**data.get("quantization", {})),
                files={name: FileEntry(**entry) for name, entry in data["files"].items()},
                generation=dict(data.get("generation", {})),
                validation=ValidationReport.from_dict(data["validation"]) if data.get("validation") else None,
                notes=tuple(str(note) for note in data.get("notes", ())),
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
