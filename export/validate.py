"""Check a written package against transformers on the same tokens, through neoedge's own runtime.

Exact packages (fp32 weights and KV cache) must reproduce transformers' logits (`tolerance`, with a
float64 fallback for models whose fp32 rounding alone exceeds it). Packages that are not exact
(int8/int4 weights, or an int8 KV cache) must stay within the bounds of their precision: mean KL
divergence, relative logit error and top-1 agreement, measured against transformers' fp32 logits,
which equal the package's own fp32 graph to ~1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoedge.generator import Generator
from neoedge.manifest import Float64Check, Manifest, QualityCheck, ValidationReport

from .reference import exact_logits

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
    real text. Chosen from measurements (2026-12-01, onnxruntime 1.32), worst of prefill and step-wise,
    with a margin of about 3x in KL and 1.5-3x in relative error over the worst correct package:
    - correct int8 packages: mean KL up to 2.5e-4 (trained tiny model), 4.6e-4 (random weights,
      gpt-neo-125m shape); relative error up to 0.008 (trained), 0.055 (random 125M shape).
    - correct int4 packages (every block size, zero-point choice and lm_head precision): mean KL up
      to 0.016 (trained), 0.034 (random 125M shape, 12 or 24 layers); relative error up to 0.063
      (trained), 0.47 (random 125M shape); top-1 agreement where the reference is decisive: 100%.
    - broken graphs: the trained model with one attention projection's scales permuted: mean KL
      0.011 (int8), 0.34 (int4); the tied table's scales permuted: mean KL 3.0 (int8), 8.7 (int4) on
      the trained model, relative error 0.20 (int8) and 1.44 (int4) on a random one.
    Random weights give nearly uniform next-token distributions (logit spread ~0.2-0.6), so their
    KL stays small and their top-1 choices flip with any noise; the relative error judges them.
    """

    name: str
    max_mean_kl: float  # nats
    max_relative_error: float
    min_decisive_agreement: float


QUALITY_BOUNDS = {
    "int8": QualityBounds("int8", max_mean_kl=5e-3, max_relative_error=0.15, min_decisive_agreement=0.9),
    "int4": QualityBounds("int4", max_mean_kl=0.1, max_relative_error=0.7, min_decisive_agreement=0.8),
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
    four_bit = quantization.scheme == "int4" or quantization.settings.get("lm_head_bits") == 4
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
    generator = Generator(package_dir, prepack=manifest.quantization.scheme != "none")
    info = manifest.model
    length = min(info.context_length, max(2 * info.window_size + 16, MIN_QUALITY_POSITIONS if bounds else 0))
    ids = np.random.default_rng(seed).integers(0, info.vocab_size, size=length, dtype=np.int64)
    reference = reference_logits(model, ids)
    prefill = generator.logits(ids)
    start = max(1, length - decode_steps)
    stepwise = generator.stepwise_logits(ids, prefill=start)
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
        return ValidationReport(**measured, passed=not quality.problems, quality=quality)
    worst = max(measured["max_abs_logit_diff_prefill"], measured["max_abs_logit_diff_stepwise"])
    if worst <= tolerance:
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
    """Distances of the package's logits from the reference's: mean KL and relative error as the worse
    of the prefill and of the cached steps (positions `start`..), so a fault in the decode path alone
    is not diluted by the prefill; top-1 agreement over both, at decisive positions."""
    kl_prefill, error_prefill, decisive, agree = _distances(reference, prefill)
    kl_steps, error_steps, decisive_steps, agree_steps = _distances(reference[start:], stepwise[start:])
    decisive += decisive_steps
    agreement = (agree + agree_steps) / decisive if decisive >= MIN_DECISIVE_POSITIONS else None
    return QualityCheck(
        bounds=bounds.name,
        mean_kl=max(kl_prefill, kl_steps), max_mean_kl=bounds.max_mean_kl,
        relative_error=max(error_prefill, error_steps), max_relative_error=bounds.max_relative_error,
        decisive_positions=decisive, decisive_agreement=agreement,
        min_decisive_agreement=bounds.min_decisive_agreement,
    )


def _distances(reference: np.ndarray, package: np.ndarray, rows: int = 64) -> tuple[float, float, int, int]:
    """(mean KL(reference || package), relative error, decisive positions, agreements there).

    The relative error is the rms of the logit error over the rms of the reference logits, both
    centred per position (a softmax ignores a constant shift). Computed a few rows at a time: a
    [positions, 50257] float64 array is 200 MB."""
    kl_sum = error_sq = signal_sq = 0.0
    decisive = agreements = 0
    for begin in range(0, len(reference), rows):
        ref = reference[begin:begin + rows].astype(np.float64)
        out = package[begin:begin + rows].astype(np.float64)
        ref -= ref.mean(-1, keepdims=True)
        out -= out.mean(-1, keepdims=True)
        error_sq += float(np.square(out - ref).sum())
        signal_sq += float(np.square(ref).sum())
        log_ref, log_out = _log_softmax(ref), _log_softmax(out)
        probs = np.exp(log_ref)
        kl_sum += float((probs * (log_ref - log_out)).sum())
        top2 = np.partition(probs, -2, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] >= DECISIVE_MARGIN
        decisive += int(sure.sum())
        agreements += int((ref.argmax(-1) == out.argmax(-1))[sure].sum())
    relative = np.sqrt(error_sq / signal_sq) if signal_sq > 0 else (0.0 if error_sq == 0 else np.inf)
    return kl_sum / len(reference), float(relative), decisive, agreements


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
