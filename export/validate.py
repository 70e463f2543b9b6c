"""Check a written package against transformers on the same tokens, through neoedge's own runtime.

Exact packages (fp32 weights and KV cache) must reproduce transformers' logits (`tolerance`, with a
float64 fallback for models whose fp32 rounding alone exceeds it). Packages that are not exact
(int8/int4 weights, or an int8 KV cache) must stay within the bounds of their precision: mean KL
divergence, relative logit error and top-1 agreement, measured against transformers' fp32 logits,
which equal the package's own fp32 graph to ~1e-5.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoedge.model import Model
from neoedge.session import SessionSettings
from neoedge.manifest import Float64Check, Manifest, QualityCheck, ValidationReport

from .reference import exact_logits

log = logging.getLogger(__name__)

# An fp32 package passes if it is within `tolerance` of transformers, or else no further from the
# exact (float64) logits than this many times transformers' own fp32 rounding error.
ROUNDING_MARGIN = 2.0
# The sequence spans two local-attention windows plus a margin, so the window is crossed both in the
# prefill and by the cached decode steps, where ports of GPT-Neo have gone wrong before; a package
# that is not exact gets at least this many positions (when the context allows), so that its quality
# figures are not decided by a handful of tokens.
MIN_QUALITY_POSITIONS = 256


@dataclass(frozen=True)
class QualityBounds:
    """What a package that is not exact may differ from fp32 by, on the validation sequence.

    These catch a broken graph (wrong packing, scales, layout or cache), not a marginal loss of
    quality, which benchmarks/quality.py and tests/test_quality.py measure on a trained model with
    real text. Chosen from measurements (2026-12-01, onnxruntime 1.32, worst of prefill and step-wise):
    - trained tiny model (export/assets), every int8/int4 setting: mean KL up to 2.5e-4 (int8),
      0.016 (int4); relative error up to 0.008 / 0.063; top-1 agreement at decisive positions 100%.
      Bounds: KL 5e-3 / 0.1 and relative error 0.15 / 0.7 leave a margin of 6x or more.
    - the same model with one weight's block scales permuted: layer 0's attention projection gives
      mean KL 0.021 (int8) / 0.63 (int4), the tied table's 2.8 / 9.1: all refused.
    - random weights predict nearly uniformly (no decisive position) and large random models amplify
      any weight error chaotically: correct packages of the gpt-neo-125m shape reach relative error
      0.055 (int8) / 0.47 (int4), of the 1.3B shape 0.63 / 0.92 (mean KL 0.16 / 0.35), where garbage
      gives 1.0-1.5. For such a reference quality cannot be judged, only garbage: the logits' correlation
      must be >= 0.3 (correct packages: 0.80 / 0.57 at the 1.3B shape, 0.86 / 0.59 at the 2.7B width
      with 12 layers; a random model with its table's scales permuted: below 0). It applies to every
      package; the other limits apply where the reference is decisive at MIN_DECISIVE_POSITIONS or more.
    """

    name: str
    max_mean_kl: float  # nats
    max_relative_error: float
    min_decisive_agreement: float
    min_correlation: float  # the only limit for a reference without decisive positions


QUALITY_BOUNDS = {
    "int8": QualityBounds("int8", max_mean_kl=5e-3, max_relative_error=0.15, min_decisive_agreement=0.9,
                          min_correlation=0.3),
    "int4": QualityBounds("int4", max_mean_kl=0.1, max_relative_error=0.7, min_decisive_agreement=0.8,
                          min_correlation=0.3),
}
# A position is decisive when the reference's most likely token leads the next by this much
# probability; top-1 agreement is judged there only, and only with enough such positions.
DECISIVE_MARGIN = 0.1
MIN_DECISIVE_POSITIONS = 16


def quality_bounds(manifest: Manifest) -> QualityBounds | None:
    """The bounds a package is held to; None for an exact (fp32 weights and cache) package."""
    quantization = manifest.quantization
    if quantization.scheme == "none":
        return None if manifest.graph.kv_cache == "float32" else QUALITY_BOUNDS["int8"]
    four_bit = quantization.scheme == "int4" or (quantization.settings is not None and quantization.settings.lm_head_bits == 4)
    return QUALITY_BOUNDS["int4" if four_bit else "int8"]


def reference_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids[None])).logits[0].float().numpy()


def validate_package(package_dir: Path, model: Any, *, tolerance: float = 1e-4, seed: int = 0,
                     decode_steps: int = 32) -> ValidationReport:
    """Compare logits of the prefill (every position) and of step-wise decoding with the KV cache.

    An exact package passes within `tolerance` of transformers, or, for models large enough that fp32
    rounding alone exceeds it, as close to the float64 logits as transformers' fp32 logits are
    (within ROUNDING_MARGIN). Any other package passes within the QUALITY_BOUNDS of its precision.
    """
    manifest = Manifest.read(package_dir)
    bounds = quality_bounds(manifest)
    # fp32 weights are checked as stored, memory-mapped: repacking them would put a second copy of a
    # large model in memory (and take a minute at 1.3B). Quantized kernels need their packed layout.
    prepack = manifest.quantization.scheme != "none"
    runtime = Model(package_dir, settings=SessionSettings(prepack=prepack, kernels="off"))
    info = manifest.model
    length = min(info.context_length, max(2 * info.window_size + 16, MIN_QUALITY_POSITIONS if bounds else 0))
    ids = np.random.default_rng(seed).integers(0, info.vocab_size, size=length, dtype=np.int64)
    reference = reference_logits(model, ids)
    prefill = runtime.logits(ids)
    start = max(1, length - decode_steps)
    stepwise = runtime.stepwise_logits(ids, prefill=start)
    measured = dict(
        positions=length,
        window_size=info.window_size,
        decode_steps=length - start,
        max_abs_logit_diff_prefill=float(np.abs(prefill - reference).max()),
        max_abs_logit_diff_stepwise=float(np.abs(stepwise - reference).max()),
        top1_agreement=float((prefill.argmax(-1) == reference.argmax(-1)).mean()),
    )
    if bounds is not None:
        quality = judge_quality(reference, prefill, stepwise, start, bounds)
        kernel_quality = None
        if manifest.graph.kernel_file is not None:
            on_kernels = Model(package_dir, settings=SessionSettings(prepack=prepack))
            if on_kernels.kernels.available:
                kernel_quality = judge_quality(reference, on_kernels.logits(ids),
                                               on_kernels.stepwise_logits(ids, prefill=start), start, bounds)
            else:
                log.info("the kernel graph is not validated here: %s", on_kernels.kernels.reason)
        passed = not quality.problems and not (kernel_quality and kernel_quality.problems)
        return ValidationReport(**measured, passed=passed, quality=quality, kernel_graph=kernel_quality)
    worst = float(np.max([measured["max_abs_logit_diff_prefill"], measured["max_abs_logit_diff_stepwise"]]))
    if worst <= tolerance:  # False for NaN
        return ValidationReport(**measured, passed=True, tolerance=tolerance)
    exact = exact_logits(model, ids)
    float64 = Float64Check(
        max_abs_error_transformers=float(np.abs(reference - exact).max()),
        max_abs_error_prefill=float(np.abs(prefill - exact).max()),
        max_abs_error_stepwise=float(np.abs(stepwise - exact).max()),
        margin=ROUNDING_MARGIN,
    )
    return ValidationReport(**measured, passed=float64.passed, tolerance=tolerance, float64=float64)


def judge_quality(reference: np.ndarray, prefill: np.ndarray, stepwise: np.ndarray, start: int,
                  bounds: QualityBounds) -> QualityCheck:
    """Distances of the package's logits from the reference's: the worse of the prefill and of the
    cached steps (positions `start`..), so a fault in the decode path alone is not diluted by the
    prefill; top-1 agreement over both, at decisive positions."""
    prefill_distances = _distances(reference, prefill)
    step_distances = _distances(reference[start:], stepwise[start:])
    decisive = prefill_distances.decisive + step_distances.decisive
    measured = dict(
        bounds=bounds.name,
        decisive_positions=decisive,
        # np.max/np.min: a NaN in either pass is the result (it fails every bound).
        mean_kl=float(np.max([prefill_distances.mean_kl, step_distances.mean_kl])),
        relative_error=float(np.max([prefill_distances.relative_error, step_distances.relative_error])),
        correlation=float(np.min([prefill_distances.correlation, step_distances.correlation])),
        decisive_agreement=(prefill_distances.agreements + step_distances.agreements) / decisive if decisive else None,
        min_correlation=bounds.min_correlation,
    )
    if decisive < MIN_DECISIVE_POSITIONS:
        return QualityCheck(**measured)
    return QualityCheck(**measured, max_mean_kl=bounds.max_mean_kl, max_relative_error=bounds.max_relative_error,
                        min_decisive_agreement=bounds.min_decisive_agreement)


@dataclass(frozen=True)
class _Distances:
    mean_kl: float
    relative_error: float
    correlation: float
    decisive: int
    agreements: int  # at the decisive positions


def _distances(reference: np.ndarray, package: np.ndarray, rows: int = 64) -> _Distances:
    """How far the package's logits are from the reference's, both centred per position (a softmax
    ignores a constant shift). Computed a few rows at a time: a [positions, 50257] float64 array is
    200 MB."""
    kl_sum = error_sq = reference_sq = package_sq = product = 0.0
    decisive = agreements = 0
    for begin in range(0, len(reference), rows):
        ref = reference[begin:begin + rows].astype(np.float64)
        out = package[begin:begin + rows].astype(np.float64)
        ref -= ref.mean(-1, keepdims=True)
        out -= out.mean(-1, keepdims=True)
        error_sq += float(np.square(out - ref).sum())
        reference_sq += float(np.square(ref).sum())
        package_sq += float(np.square(out).sum())
        product += float((out * ref).sum())
        log_ref, log_out = _log_softmax(ref), _log_softmax(out)
        probs = np.exp(log_ref)
        kl_sum += float((probs * (log_ref - log_out)).sum())
        top2 = np.partition(probs, -2, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] >= DECISIVE_MARGIN
        decisive += int(sure.sum())
        agreements += int((ref.argmax(-1) == out.argmax(-1))[sure].sum())
    relative = np.sqrt(error_sq / reference_sq) if reference_sq > 0 else (0.0 if error_sq == 0 else np.inf)
    # Constant logits (no signal at all) correlate with nothing.
    correlation = product / np.sqrt(reference_sq * package_sq) if reference_sq * package_sq > 0 else 0.0
    return _Distances(kl_sum / len(reference), float(relative), float(correlation), decisive, agreements)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
