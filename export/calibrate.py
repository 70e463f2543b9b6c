"""Calibrated scales for an int8 KV cache: per channel (head, head dimension), from real activations.

Fixed scales clip or waste range; these come from running the checkpoint itself over offline English
text (the standard library's docstrings, training split), recording the largest |key| and |value|
each channel produces.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .tiny import split_corpus, stdlib_docstrings


def calibration_batches(tokenizer_json: str, length: int, count: int = 8) -> list[np.ndarray]:
    """`count` sequences of `length` token ids cut from the calibration text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    train, _ = split_corpus(stdlib_docstrings())
    ids: list[int] = []
    for doc in train:
        ids += tokenizer.encode(doc, add_special_tokens=False).ids
        if len(ids) >= length * count:
            break
    stream = np.asarray(ids, dtype=np.int64)
    count = max(1, min(count, len(stream) // length))
    return [stream[i * length:(i + 1) * length] for i in range(count)]


def kv_cache_scales(model: Any, batches: list[np.ndarray], num_heads: int,
                    on_batch: Callable[[], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (key scale, value scale), each float32 [heads, 1, head_size]: max |x| / 127.
    `on_batch` is called after each batch (minutes in all for a 2.7B model: a progress bar's hook)."""
    import torch

    maxima: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, block in enumerate(model.transformer.h):
        for kind in ("k", "v"):
            def record(_module, _inputs, output, key=(index, kind)):
                peak = output.detach().abs().amax(dim=(0, 1))
                maxima[key] = torch.maximum(maxima[key], peak) if key in maxima else peak
            hooks.append(getattr(block.attn.attention, f"{kind}_proj").register_forward_hook(record))
    try:
        with torch.no_grad():
            for batch in batches:
                model(torch.from_numpy(batch[None]))
                if on_batch is not None:
                    on_batch()
    finally:
        for hook in hooks:
            hook.remove()
    scales = []
    for index in range(len(model.transformer.h)):
        pair = []
        for kind in ("k", "v"):
            peak = maxima[(index, kind)].float().numpy()
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            pair.append(scale.reshape(num_heads, 1, -1))
        scales.append((pair[0], pair[1]))
    return scales
