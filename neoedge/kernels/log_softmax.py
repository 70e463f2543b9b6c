"""log_softmax_at in the kernel library (log_softmax.cpp), through ctypes: two reads of each row
instead of numpy's six passes. neoedge/scoring.py falls back to numpy where it is missing."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any

import numpy as np

from . import avx512_function

UNORDERED = 2  # a row the library left to numpy (a NaN or an infinite logit)


@lru_cache(maxsize=None)
def _function() -> Any:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    return avx512_function("neoedge_log_softmax_at", ctypes.c_int, [pointer, size, size, size, pointer, pointer,
                                                                     pointer])[0]


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(log p(target) float64 [n], greedy uint8 [n]: 1 if the target is the argmax, UNORDERED for a
    row left to the caller), or None where the library cannot (not built, no AVX-512, disabled, or
    logits whose rows are not contiguous float32)."""
    function = _function()
    if function is None or logits.dtype != np.float32 or logits.ndim != 2 or logits.strides[1] != 4:
        return None
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"log_softmax_at: {rows} rows of logits but targets of shape {targets.shape}")
    logprobs = np.empty(rows, np.float64)
    greedy = np.empty(rows, np.uint8)
    status = function(logits.ctypes.data, rows, vocab, logits.strides[0] // 4, targets.ctypes.data,
                      logprobs.ctypes.data, greedy.ctypes.data)
    if status != 0:
        return None  # -2: no AVX-512 here; -1: a target out of range, which numpy's indexing reports
    return logprobs, greedy
