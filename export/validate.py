"""Check a written package against transformers on the same tokens, through neoedge's own runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neoedge.generator import Generator
from neoedge.manifest import Manifest, worst_validation_error

from .reference import exact_logits


def reference_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids[None])).logits[0].float().numpy()


# An fp32 package passes if it is within `tolerance` of transformers, or else no further from the
# exact (float64) logits than this many times transformers' own fp32 rounding error.
ROUNDING_MARGIN = 2.0


def validate_package(package_dir: Path, model: Any, *, tolerance: float | None = None, seed: int = 0,
                     decode_steps: int = 32) -> dict[str, Any]:
    """Compare logits of the prefill (every position) and of step-wise decoding with the KV cache.

    The sequence spans two local-attention windows plus a margin, so the window is crossed both in
    the prefill and by the cached decode steps, where ports of GPT-Neo have gone wrong before.
    With a `tolerance` (fp32 packages) the report says whether the package `passed`: within the
    tolerance of transformers, or, for models large enough that fp32 rounding alone exceeds it, as
    close to the float64 logits as transformers' fp32 logits are (within ROUNDING_MARGIN).
    """
    # fp32 weights are checked as stored, memory-mapped: repacking them would put a second copy of a
    # large model in memory (and take a minute at 1.3B). Quantized kernels need their packed layout.
    quantized = Manifest.read(package_dir).quantization.scheme != "none"
    generator = Generator(package_dir, prepack=quantized)
    info = generator.manifest.model
    length = min(info.context_length, 2 * info.window_size + 16)
    ids = np.random.default_rng(seed).integers(0, info.vocab_size, size=length, dtype=np.int64)
    reference = reference_logits(model, ids)
    prefill = generator.logits(ids)
    stepwise = generator.stepwise_logits(ids, prefill=max(1, length - decode_steps))
    report: dict[str, Any] = {
        "positions": length,
        "window_size": info.window_size,
        "decode_steps": min(decode_steps, length - 1),
        "max_abs_logit_diff_prefill": float(np.abs(prefill - reference).max()),
        "max_abs_logit_diff_stepwise": float(np.abs(stepwise - reference).max()),
        "top1_agreement": float((prefill.argmax(-1) == reference.argmax(-1)).mean()),
        "tolerance": tolerance,
    }
    if tolerance is None:
        return report
    report["passed"] = worst_validation_error(report, "max_abs_logit_diff") <= tolerance
    if not report["passed"]:
        exact = exact_logits(model, ids)
        errors = {
            "max_abs_error_transformers": float(np.abs(reference - exact).max()),
            "max_abs_error_prefill": float(np.abs(prefill - exact).max()),
            "max_abs_error_stepwise": float(np.abs(stepwise - exact).max()),
            "margin": ROUNDING_MARGIN,
        }
        report["float64"] = errors
        rounding = errors["max_abs_error_transformers"]
        report["passed"] = worst_validation_error(errors, "max_abs_error") <= ROUNDING_MARGIN * rounding
    return report


def describe_failure(report: dict[str, Any]) -> str:
    worst = worst_validation_error(report, "max_abs_logit_diff")
    text = (f"the exported graph's logits differ from transformers by {worst:.3g} "
            f"(tolerance {report['tolerance']:g}) over {report['positions']} positions")
    if "float64" in report:
        f = report["float64"]
        text += (f", and from the exact float64 logits by {worst_validation_error(f, 'max_abs_error'):.3g}, "
                 f"more than {f['margin']:g}× transformers' own fp32 error "
                 f"({f['max_abs_error_transformers']:.3g})")
    return text
