"""Check a written package against transformers on the same tokens, through neoedge's own runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neoedge.generator import Generator


def reference_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids[None])).logits[0].float().numpy()


def validate_package(package_dir: Path, model: Any, *, seed: int = 0, decode_steps: int = 32) -> dict[str, Any]:
    """Compare logits of the prefill (every position) and of step-wise decoding with the KV cache.

    The sequence spans two local-attention windows plus a margin, so the window is crossed both in
    the prefill and by the cached decode steps, where ports of GPT-Neo have gone wrong before.
    """
    generator = Generator(package_dir)
    info = generator.manifest.model
    length = min(info.context_length, 2 * info.window_size + 16)
    ids = np.random.default_rng(seed).integers(0, info.vocab_size, size=length, dtype=np.int64)
    reference = reference_logits(model, ids)
    prefill = generator.logits(ids)
    stepwise = generator.stepwise_logits(ids, prefill=max(1, length - decode_steps))
    return {
        "positions": length,
        "window_size": info.window_size,
        "decode_steps": min(decode_steps, length - 1),
        "max_abs_logit_diff_prefill": float(np.abs(prefill - reference).max()),
        "max_abs_logit_diff_stepwise": float(np.abs(stepwise - reference).max()),
        "top1_agreement": float((prefill.argmax(-1) == reference.argmax(-1)).mean()),
    }
