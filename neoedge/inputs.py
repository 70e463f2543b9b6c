"""Token ids from callers: checked once, in time linear in their number, before any work.

A list of token ids reaches numpy, where a float is truncated, a bool becomes 0 or 1, a nested
list is flattened or refused depending on its shape, and an out-of-range id wraps around; each
would silently score or generate from the wrong tokens. Here each is an error that says which
element is wrong and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import PromptError


def token_ids(ids: Any, *, vocab_size: int, max_length: int, what: str = "token_ids",
              why: str = "", allow_empty: bool = False) -> np.ndarray:
    """`ids` as a one-dimensional int64 array of 1..max_length ids in [0, vocab_size) (0.. with
    `allow_empty`); else PromptError. A list, tuple or range of Python or numpy integers, or a 1-D
    integer numpy array."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise PromptError(f"{what} must be one-dimensional, got an array of shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise PromptError(f"{what} must hold integers, got an array of {ids.dtype}")
        if allow_empty and not len(ids):
            return ids.astype(np.int64)
        _check_length(len(ids), max_length, what, why)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
            raise PromptError(f"{what}[{bad}] is {int(ids[bad])}: token ids must be in [0, {vocab_size})")
        return ids.astype(np.int64, copy=False)
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise PromptError(f"{what} must be a sequence of integers, got {type(ids).__name__}")
    if allow_empty and not len(ids):
        return np.zeros(0, np.int64)
    _check_length(len(ids), max_length, what, why)
    for index, value in enumerate(ids):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise PromptError(f"{what}[{index}] is {_show(value)}: token ids must be integers")
        if not 0 <= value < vocab_size:
            raise PromptError(f"{what}[{index}] is {int(value)}: token ids must be in [0, {vocab_size})")
    return np.fromiter(ids, dtype=np.int64, count=len(ids))


def _check_length(length: int, max_length: int, what: str, why: str) -> None:
    if length == 0:
        raise PromptError(f"{what} is empty: pass at least one token (e.g. the bos id)")
    if length > max_length:
        raise PromptError(f"{what} holds {length} tokens, more than the {max_length} that fit{why}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(value).__name__})"
