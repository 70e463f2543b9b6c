"""The model-package format: one directory, one manifest (`neoedge.json`), one schema.

The exporter writes this manifest and the runtime reads nothing else to learn the model's shape,
the graph's input/output names and how the package was quantized. It never needs Hugging Face code.

Reading is strict: every key is known, every value has its declared type (a bool is not an int, 1.0
is not 1) and lies in its range, every path is a plain relative path, and the manifest carries a
seal — the sha256 of its own bytes — so that no byte of it can change unnoticed. Each schema class
checks itself when it is made, so the exporter cannot write what the runtime would refuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
import string
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import FormatVersionError, IntegrityError, ManifestError, OptionsError, PackagePathError
from .options import GenerationOptions

MANIFEST_NAME = "neoedge.json"
FORMAT_NAME = "neoedge-model-package"
# 2: the manifest is sealed, generation defaults are typed, unknown keys are refused.
FORMAT_VERSION = 2
# The manifest's own sha256, computed over its bytes with this value written as 64 zeros.
SEAL_KEY = "manifest_sha256"
_SEAL_PLACEHOLDER = "0" * 64
_SEAL_PATTERN = re.compile(rb'"' + SEAL_KEY.encode() + rb'": "([0-9a-f]{64})"')
# A manifest is a few KB; anything far larger is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 1 << 20
# Dimensions feed int32 inputs of the graph (sequence lengths) and numpy allocations.
MAX_DIMENSION = 2**31 - 1
# A package path: relative, "/"-separated, each part a plain file name. This excludes absolute
# paths, "." and "..", drive letters, backslashes, and onnxruntime's "*/_ORT_MEM_ADDR_/*" location.
_PATH_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_PATH_CHARS = 1024

AttentionKind = Literal["global", "local"]
# "gqa": onnxruntime's GroupQueryAttention over a preallocated cache updated in place (fast path).
# "plain": standard ONNX ops, past concatenated inside the graph (portable reference/fallback).
AttentionImpl = Literal["gqa", "plain"]


# -- checks shared by the schema classes ----------------------------------------------------------
def check_package_path(name: Any, where: str) -> str:
    """`name` if it is a plain relative path inside a package, else PackagePathError. Only the
    syntax is checked here; package.py resolves it on disk (symlinks)."""
    if not isinstance(name, str):
        raise ManifestError(f"{where} must be a string, got {_show(name)}")
    if not name or len(name) > MAX_PATH_CHARS or not all(_PATH_PART.fullmatch(p) for p in name.split("/")):
        raise PackagePathError(
            f"{where} {name[:200]!r} is not a path inside the package: paths are relative, '/'-separated "
            "names of letters, digits, '.', '_' and '-' (no absolute paths, no '..', no hidden names)")
    return name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """`value` if it has the type `hint` (as JSON gives it: a list stands for a tuple), converted
    to that type; else ManifestError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise ManifestError(f"{where} must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint_ in inner[:-1]:  # e.g. int | tuple[int, ...]: the first type the value has
            try:
                return _check_type(value, hint_, where)
            except ManifestError:
                pass
        return _check_type(value, inner[-1], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"{where} must be a list, got {_show(value)}")
        return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ManifestError(f"{where} must be an object with string keys, got {_show(value)}")
        return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, hint)
    if not ok:
        article = "an" if hint.__name__[0] in "aeiou" else "a"
        raise ManifestError(f"{where} must be {article} {hint.__name__}, got {_show(value)}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(obj: Any, section: str) -> None:
    """Type-check (and convert) every field of a schema dataclass, in place."""
    hints = _hints(type(obj))
    for f in fields(obj):
        object.__setattr__(obj, f.name, _check_type(getattr(obj, f.name), hints[f.name],
                                                      f"{section}.{f.name}" if section else f.name))


def _check_range(section: str, name: str, value: int, minimum: int, maximum: int = MAX_DIMENSION) -> None:
    if not minimum <= value <= maximum:
        raise ManifestError(f"{section}.{name} must be between {minimum} and {maximum}, got {value}")


def _section(cls: type, data: Any, section: str) -> Any:
    """A schema dataclass from its JSON object: no unknown key, no missing required one."""
    if not isinstance(data, dict):
        raise ManifestError(f"{section} must be an object, got {_show(data)}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ManifestError(f"unknown key(s) in {section}: {', '.join(map(repr, unknown))}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ManifestError(f"{section} is missing {', '.join(map(repr, missing))}")
    return cls(**data)


# -- the schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """The model's shape and special tokens (`model` in the manifest)."""

    architecture: Literal["GPTNeoForCausalLM"]
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

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "window_size"):
            _check_range("model", name, getattr(self, name), 1)
        _check_range("model", "context_length", self.context_length, 2)
        if self.hidden_size % self.num_heads:
            raise ManifestError(f"model.hidden_size ({self.hidden_size}) is not a multiple of "
                                f"model.num_heads ({self.num_heads})")
        if len(self.attention_layers) != self.num_layers:
            raise ManifestError(f"model.attention_layers lists {len(self.attention_layers)} layers, "
                                f"model.num_layers is {self.num_layers}")
        for name in ("bos_token_id", "eos_token_id"):
            _check_range("model", name, getattr(self, name), 0, self.vocab_size - 1)

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
    # The same graph with its MatMulNBits and int8-cache attention nodes run by neoedge's native
    # kernels (neoedge.kernels), reading the same weights file; None when the package has none (fp32,
    # or written without it).
    kernel_file: str | None = None
    # The kernel graph with the weights its tiled path rearranges stored already rearranged, in a
    # weights file of its own (export --tiled-weights); loaded instead of kernel_file where the
    # kernels tile weights (neoedge.kernels.KernelInfo.tiled_weights). None when not written.
    tiled_kernel_file: str | None = None
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

    _TEMPLATES = ("past_key", "past_value", "present_key", "present_value")

    def __post_init__(self) -> None:
        _check_fields(self, "graph")
        check_package_path(self.file, "graph.file")
        if self.kernel_file is not None:
            check_package_path(self.kernel_file, "graph.kernel_file")
            if self.kernel_file == self.file:
                raise ManifestError("graph.kernel_file and graph.file name the same file")
        if self.tiled_kernel_file is not None:
            check_package_path(self.tiled_kernel_file, "graph.tiled_kernel_file")
            if self.kernel_file is None:
                raise ManifestError("graph.tiled_kernel_file needs graph.kernel_file (the graph it tiles)")
            if self.tiled_kernel_file in (self.file, self.kernel_file):
                raise ManifestError("graph.tiled_kernel_file names the same file as another graph")
        for f in fields(self):
            if f.name in ("file", "attention", "kv_cache", "kernel_file", "tiled_kernel_file"):
                continue
            value = getattr(self, f.name)
            if not value or not value.isprintable():
                raise ManifestError(f"graph.{f.name} must be a non-empty printable name, got {_show(value)}")
            template = f.name in self._TEMPLATES
            parsed = [part[1] for part in string.Formatter().parse(value) if part[1] is not None] \
                if "{" in value or "}" in value else []
            if template and (parsed != ["layer"] or not _formats(value)):
                raise ManifestError(f"graph.{f.name} must hold '{{layer}}' once (e.g. 'past_key.{{layer}}'), "
                                    f"got {_show(value)}")
            if not template and parsed:
                raise ManifestError(f"graph.{f.name} must be a plain name, got {_show(value)}")
        if self.kv_cache == "int8" and self.attention != "gqa":
            raise ManifestError("graph.kv_cache 'int8' needs graph.attention 'gqa'")

    def cache_pairs(self, layer: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """((past key, present key), (past value, present value)) input/output names of a layer."""
        return ((self.past_key.format(layer=layer), self.present_key.format(layer=layer)),
                (self.past_value.format(layer=layer), self.present_value.format(layer=layer)))

    def input_names(self, num_layers: int) -> list[str]:
        """Every input the runtime feeds, in a fixed order."""
        names = [self.input_ids, self.position_ids, self.logits_positions]
        if self.attention == "gqa":
            names += [self.seqlens_k, self.total_sequence_length, self.local_seqlens_k,
                      self.local_total_sequence_length]
        return names + [past for layer in range(num_layers) for past, _ in self.cache_pairs(layer)]

    def output_names(self, num_layers: int) -> list[str]:
        """Every output the runtime reads, in a fixed order."""
        return [self.logits] + [present for layer in range(num_layers) for _, present in self.cache_pairs(layer)]


def _formats(template: str) -> bool:
    try:
        template.format(layer=0)
    except (ValueError, KeyError, IndexError, AttributeError):
        return False
    return True


@dataclass(frozen=True)
class CalibrationInfo:
    """The text a quantized package's weights (and int8 KV cache scales) were calibrated on
    (`quantization.settings.calibration`)."""

    text: str  # "built-in: <file>" for the corpus that ships with neoedge, else the file's name
    sha256: str  # of the text's UTF-8 bytes
    sequences: int
    tokens_per_sequence: int

    def __post_init__(self) -> None:
        _check_fields(self, "quantization.settings.calibration")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ManifestError(f"quantization.settings.calibration.sha256 must be 64 lowercase hex digits, "
                                f"got {_show(self.sha256)}")
        for name in ("sequences", "tokens_per_sequence"):
            _check_range("quantization.settings.calibration", name, getattr(self, name), 1)


# How a quantized package's codes and scales were chosen (export/scheme.py): rtn (round-to-nearest),
# weighted-clip, awq or gptq.
QuantizationAlgorithm = Literal["rtn", "weighted-clip", "awq", "gptq"]


@dataclass(frozen=True)
class QuantizationSettings:
    """How a quantized package's weights are stored (`quantization.settings`): MatMulNBits blocks,
    and how their codes were chosen."""

    bits: Literal[4, 8]
    block_size: int | tuple[int, ...]  # one size, or the sizes used where a default had to shrink
    lm_head_bits: Literal[4, 8]
    zero_point: Literal["symmetric", "asymmetric"]
    accuracy_level: int = 4
    algorithm: QuantizationAlgorithm = "rtn"
    damping: float | None = None  # gptq: fraction of H's mean diagonal added to it
    act_order: bool | None = None  # gptq
    # Data-aware algorithms, the tied table: its lm_head inputs' second moment plus the token
    # lookup's, either lookup_weight x the empirical Fisher of the embeddings over fisher_sequences
    # calibration sequences, or (lookup_weight 0) table_damping x the inputs' mean square per channel.
    table_damping: float | None = None
    lookup_weight: float | None = None
    fisher_sequences: int | None = None
    # Data-aware algorithms: block scales refitted by least squares to the codes (refit), and the
    # token lookup's own scales for the tied table's codes (lookup_scales).
    refit: bool | None = None
    lookup_scales: bool | None = None
    calibration: CalibrationInfo | None = None
    method: Literal["MatMulNBits"] = "MatMulNBits"
    embedding: Literal["tied, shared with lm_head", "untied: lm_head stored separately"] = \
        "tied, shared with lm_head"

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            object.__setattr__(self, "calibration", _section(CalibrationInfo, self.calibration,
                                                             "quantization.settings.calibration"))
        _check_fields(self, "quantization.settings")
        blocks = (self.block_size,) if isinstance(self.block_size, int) else self.block_size
        if not blocks or any(b < 16 or b & (b - 1) for b in blocks):
            raise ManifestError(f"quantization.settings.block_size must be powers of two >= 16, "
                                f"got {_show(self.block_size)}")
        _check_range("quantization.settings", "accuracy_level", self.accuracy_level, 0, 4)
        if self.damping is not None and not 0 < self.damping <= 1:
            raise ManifestError(f"quantization.settings.damping must be in (0, 1], got {self.damping}")
        if self.table_damping is not None and self.table_damping < 0:
            raise ManifestError(f"quantization.settings.table_damping must be >= 0, got {self.table_damping}")
        if self.algorithm != "rtn" and self.calibration is None:
            raise ManifestError(f"quantization.settings.algorithm {self.algorithm!r} is data-aware but "
                                "no calibration is recorded")

    def describe(self) -> str:
        """One line, e.g. "4-bit MatMulNBits, block 128, symmetric, lm_head 4-bit, gptq (...)"."""
        blocks = self.block_size if isinstance(self.block_size, int) else "/".join(map(str, self.block_size))
        text = (f"{self.bits}-bit {self.method}, block {blocks}, {self.zero_point}, lm_head {self.lm_head_bits}-bit, "
                f"{self.algorithm}")
        details = [f"{name} {value}" for name, value in
                   (("damping", self.damping), ("act_order", self.act_order), ("table_damping", self.table_damping),
                    ("lookup_weight", self.lookup_weight), ("fisher_sequences", self.fisher_sequences),
                    ("refit", self.refit), ("lookup_scales", self.lookup_scales))
                   if value is not None]
        if self.calibration is not None:
            c = self.calibration
            details.append(f"calibrated on {c.sequences}x{c.tokens_per_sequence} tokens of {c.text}")
        return text + (f" ({', '.join(details)})" if details else "")


@dataclass(frozen=True)
class Quantization:
    """How the weights are stored (`quantization`)."""

    scheme: Literal["none", "int8", "int4"] = "none"
    settings: QuantizationSettings | None = None  # None for fp32

    def __post_init__(self) -> None:
        settings = self.settings
        if isinstance(settings, dict):
            # fp32 packages of an earlier neoedge wrote {}
            object.__setattr__(self, "settings", _section(QuantizationSettings, settings, "quantization.settings")
                               if settings else None)
        _check_fields(self, "quantization")
        if (self.scheme == "none") != (self.settings is None):
            raise ManifestError(f"quantization.scheme {self.scheme!r} and its settings disagree: settings are "
                                "given exactly for int8 and int4")
        if self.settings is not None and self.settings.bits != int(self.scheme[3:]):
            raise ManifestError(f"quantization.settings.bits {self.settings.bits} does not match the scheme "
                                f"{self.scheme!r}")


@dataclass(frozen=True)
class FileEntry:
    """One file of the package: its sha256 and size (`files`)."""

    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        _check_fields(self, "")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ManifestError(f"sha256 must be 64 lowercase hex digits, got {_show(self.sha256)}")
        if self.bytes < 0:
            raise ManifestError(f"bytes must be >= 0, got {self.bytes}")


@dataclass(frozen=True)
class GenerationDefaults:
    """The package's default generation options; unset (None) ones take GenerationOptions' defaults.
    The same names as GenerationOptions, validated by it."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stop_at_eos: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "generation")
        try:
            GenerationOptions(**self.as_options())
        except OptionsError as exc:
            raise ManifestError(f"generation: {exc}") from None

    def as_options(self) -> dict[str, Any]:
        """The defaults that are set, as GenerationOptions keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


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

    def __post_init__(self) -> None:
        _check_fields(self, "validation.float64")

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

    def __post_init__(self) -> None:
        _check_fields(self, "validation.quality")

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
    # The kernel graph (graph.kernel_file) judged by the same bounds, when the exporting machine
    # runs neoedge's kernels; None if the package has none or they could not run there.
    kernel_graph: QualityCheck | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "validation")

    @property
    def max_abs_logit_diff(self) -> float:
        return _worse(self.max_abs_logit_diff_prefill, self.max_abs_logit_diff_stepwise)

    @classmethod
    def from_json(cls, data: Any) -> ValidationReport | None:
        """The report as a manifest holds it (null: the package was not validated), strictly typed."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ManifestError(f"validation must be an object or null, got {_show(data)}")
        data = dict(data)
        for key, section in (("float64", Float64Check), ("quality", QualityCheck), ("kernel_graph", QualityCheck)):
            if data.get(key) is not None:
                data[key] = _section(section, data[key], f"validation.{key}")
        return _section(cls, data, "validation")

    @property
    def problems(self) -> list[str]:
        """Why the package failed (empty if it did not)."""
        if self.passed is not False:
            return []
        if self.quality is not None:
            return self.quality.problems + [f"kernel graph: {problem}" for problem in
                                            (self.kernel_graph.problems if self.kernel_graph else [])]
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
        if self.kernel_graph is not None:
            k = self.kernel_graph
            agreement = "" if k.decisive_agreement is None else f", top-1 agreement {k.decisive_agreement:.1%}"
            lines.append(f"kernel graph (neoedge kernels): mean KL {k.mean_kl:.2e} nats, relative logit error "
                         f"{k.relative_error:.3f}{agreement}, logit correlation {k.correlation:.4f}"
                         + ("" if not k.problems else " FAILED"))
        if self.passed is None:
            lines.append("not judged (exported by an older neoedge)")
        elif not self.passed:
            lines.append("FAILED: " + ", ".join(self.problems))
        return lines


@dataclass(frozen=True)
class Manifest:
    """The whole manifest, `neoedge.json`."""

    model: ModelInfo
    graph: GraphInfo
    quantization: Quantization
    files: dict[str, FileEntry]
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    validation: ValidationReport | None = None
    # What the export decided that was not asked for (e.g. the plain attention fallback), in words.
    notes: tuple[str, ...] = ()
    tokenizer: str = "tokenizer.json"
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", _section(GenerationDefaults, self.generation, "generation"))
        _check_fields(self, "")
        check_package_path(self.tokenizer, "tokenizer")
        for name in self.files:
            check_package_path(name, "files entry")
        if MANIFEST_NAME in self.files:
            raise ManifestError(f"files must not list {MANIFEST_NAME} (the manifest seals itself)")
        for what, name in (("graph.file", self.graph.file), ("graph.kernel_file", self.graph.kernel_file),
                           ("graph.tiled_kernel_file", self.graph.tiled_kernel_file), ("tokenizer", self.tokenizer)):
            if name is not None and name not in self.files:
                raise PackagePathError(f"malformed manifest: {what} {name} is not listed in files, so it "
                                       "could not be checked")
        if self.tokenizer in (self.graph.file, self.graph.kernel_file, self.graph.tiled_kernel_file):
            raise ManifestError("the tokenizer and a graph file name the same file")
        n = self.model.num_layers
        names = self.graph.input_names(n) + self.graph.output_names(n)
        if len(set(names)) != len(names):
            raise ManifestError("graph input/output names are not distinct (a template without "
                                "'{layer}', or two names alike)")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Written only when there is one: readers before this key (format_version 2 too) refuse a
        # graph section with keys they do not know, and a package without it is one they can read.
        if data["graph"]["tiled_kernel_file"] is None:
            del data["graph"]["tiled_kernel_file"]
        data["model"]["attention_layers"] = list(self.model.attention_layers)
        data["generation"] = self.generation.as_options()
        if "stop" in data["generation"]:
            data["generation"]["stop"] = list(data["generation"]["stop"])
        return {"format": FORMAT_NAME, "format_version": data.pop("format_version"), **data}

    def to_json(self) -> bytes:
        """The manifest as written: JSON, sealed with the sha256 of these very bytes."""
        return seal(self.to_dict())

    def write(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_bytes(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> Manifest:
        """A manifest from its parsed JSON (the seal, if present, is not checked here: see read)."""
        if not isinstance(data, dict):
            raise ManifestError(f"malformed {source}: expected a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source} is not a neoedge model package manifest "
                                f"(format={_show(data.get('format'))})")
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise FormatVersionError(
                f"unsupported package format_version {_show(version)} in {source}: this neoedge reads "
                f"version {FORMAT_VERSION}; re-export the model with this version of neoedge")
        known = {f.name for f in fields(cls)} | {"format", SEAL_KEY}
        unknown = sorted(set(data) - known)
        try:
            if unknown:
                raise ManifestError(f"unknown key(s): {', '.join(map(repr, unknown))}")
            missing = [k for k in ("model", "graph", "files") if k not in data]
            if missing:
                raise ManifestError(f"missing {', '.join(map(repr, missing))}")
            files = data["files"]
            if not isinstance(files, dict):
                raise ManifestError(f"files must be an object, got {_show(files)}")
            entries = {}
            for name, entry in files.items():
                try:
                    entries[name] = _section(FileEntry, entry, f"files[{name!r}]")
                except ManifestError as exc:
                    raise type(exc)(f"files[{name[:200]!r}]: {exc}") from None
            return cls(
                model=_section(ModelInfo, data["model"], "model"),
                graph=_section(GraphInfo, data["graph"], "graph"),
                quantization=_section(Quantization, data.get("quantization", {}), "quantization"),
                files=entries,
                generation=_section(GenerationDefaults, data.get("generation", {}), "generation"),
                validation=ValidationReport.from_json(data.get("validation")),
                notes=data.get("notes", ()),
                tokenizer=data.get("tokenizer", "tokenizer.json"),
                created_by=data.get("created_by", ""),
                format_version=version,
            )
        except ManifestError as exc:
            message = str(exc).removeprefix("malformed manifest: ")
            raise type(exc)(f"malformed {source}: {message}") from None

    @classmethod
    def from_json(cls, raw: bytes, *, source: str = "manifest") -> Manifest:
        """A manifest from its bytes, its seal checked."""
        data = parse_json(raw, source)
        if isinstance(data, dict) and data.get("format") == FORMAT_NAME \
                and data.get("format_version") == FORMAT_VERSION:  # a wrong version says so first
            check_seal(raw, data, source)
        return cls.from_dict(data, source=source)

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """The manifest of a package directory, strictly parsed and its seal checked. (To open the
        package, which also checks every file and path, use neoedge.package.open_package.)"""
        directory = Path(directory)
        if not directory.is_dir():
            raise IntegrityError(f"model package not found: {directory} is not a directory")
        path = directory / MANIFEST_NAME
        return cls.from_json(read_manifest_bytes(path), source=f"manifest {path}")


def read_manifest_bytes(path: Path) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{path} is not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"corrupt manifest {path}: larger than {MAX_MANIFEST_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise IntegrityError(f"{path.parent} is not a neoedge model package: {MANIFEST_NAME} is missing") from None
    except OSError as exc:
        raise IntegrityError(f"cannot read the manifest {path}: {exc.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"corrupt manifest {path}: larger than {MAX_MANIFEST_BYTES} bytes")
    return raw


def parse_json(raw: bytes, source: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or infinities."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise ValueError(f"duplicate key {duplicate!r}")
        return result

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        return value

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_float=finite,
                          parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise IntegrityError(f"corrupt {source}: {' '.join(str(exc).split())[:200]}") from None


def seal(data: dict[str, Any]) -> bytes:
    """A manifest's JSON bytes, sealed: its SEAL_KEY set to the sha256 of the bytes written with
    that value zeroed. Whatever `data` holds is written as it is (tests seal bad manifests with it)."""
    body = {k: v for k, v in data.items() if k != SEAL_KEY}
    try:
        text = json.dumps({**body, SEAL_KEY: _SEAL_PLACEHOLDER}, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:  # NaN or an infinity somewhere (a validation figure): not JSON
        raise ManifestError(f"cannot write the manifest: {exc} (a NaN or infinite value)") from None
    raw = text.encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    placeholder = f'"{SEAL_KEY}": "{_SEAL_PLACEHOLDER}"'.encode()
    start = raw.rindex(placeholder)  # the last key: nothing after it can look like it
    return raw[:start] + f'"{SEAL_KEY}": "{digest}"'.encode() + raw[start + len(placeholder):]


def check_seal(raw: bytes, data: dict[str, Any], source: str) -> None:
    """The manifest's seal must be the sha256 of its bytes with the seal's value zeroed."""
    found = list(_SEAL_PATTERN.finditer(raw))
    if SEAL_KEY not in data or len(found) != 1 or found[0].group(1).decode() != data[SEAL_KEY]:
        raise IntegrityError(f"{source} is not sealed ({SEAL_KEY} missing or malformed): it was not "
                             "written by neoedge export, or was edited")
    start, end = found[0].span(1)
    if hashlib.sha256(raw[:start] + _SEAL_PLACEHOLDER.encode() + raw[end:]).hexdigest() != data[SEAL_KEY]:
        raise IntegrityError(f"model package file {MANIFEST_NAME} is corrupt: its bytes do not match its "
                             f"{SEAL_KEY} seal ({source})")


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
