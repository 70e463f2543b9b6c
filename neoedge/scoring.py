"""Log-probabilities of given tokens: continuations of a prompt (classification, ranking, multiple
choice), computed chunk by chunk so that nobody ever holds [tokens, vocab] logits for long texts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .events import ContinuationScore
from .kernels.log_softmax import UNORDERED
from .kernels.log_softmax import log_softmax_at as native_log_softmax_at


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of logits [n, vocab] and target ids [n]: (log p(target) [n] float64, target is the
    argmax [n] bool). The exponentials are float32 (each within an ulp; they are at most 1), their
    sum and the target's shifted logit float64: within 1e-6 of a float64 log_softmax, at a third
    of its time (evaluation scores every position of every continuation over 50,257 logits). The
    kernel library does the same in two reads of each row, where it is built (4x faster again)."""
    native = native_log_softmax_at(logits, targets)
    if native is not None:
        logprobs, flags = native
        left = flags == UNORDERED  # rows with a NaN or infinite logit: numpy's answer for them
        greedy = flags == 1
        if left.any():
            logprobs[left], greedy[left] = _numpy_log_softmax_at(logits[left], targets[left])
        return logprobs, greedy
    return _numpy_log_softmax_at(logits, targets)


def _numpy_log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(targets.shape[0])
    best = logits.argmax(axis=-1)
    peak = logits[rows, best]
    shifted = logits - peak[:, None]
    np.exp(shifted, out=shifted)
    normaliser = np.log(shifted.sum(axis=-1, dtype=np.float64))
    return (logits[rows, targets].astype(np.float64) - peak) - normaliser, best == targets


def continuation_logprobs(first: np.ndarray, ids: list[int], forward: Callable[[np.ndarray], np.ndarray],
                          chunk: int) -> ContinuationScore:
    """Score `ids` after a prompt whose next-token logits are `first` [vocab].

    `forward(chunk_ids)` appends tokens to the prompt's cache and returns their logits [count, vocab]:
    the logits at continuation token i predict token i + 1, so all but the last token are run.
    """
    targets = np.asarray(ids, dtype=np.int64)
    logprobs, greedy = log_softmax_at(first[None, :], targets[:1])
    parts, flags = [logprobs], [greedy]
    for offset in range(0, len(ids) - 1, chunk):
        inputs = targets[offset: min(offset + chunk, len(ids) - 1)]
        rows = forward(inputs)
        lp, gr = log_softmax_at(rows, targets[offset + 1: offset + 1 + inputs.shape[0]])
        parts.append(lp)
        flags.append(gr)
    values = np.concatenate(parts)
    return ContinuationScore(tokens=tuple(ids), logprobs=tuple(float(v) for v in values),
                             greedy=bool(np.concatenate(flags).all()))
