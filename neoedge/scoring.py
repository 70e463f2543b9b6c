"""Log-probabilities of given tokens: continuations of a prompt (classification, ranking, multiple
choice), computed chunk by chunk so that nobody ever holds [tokens, vocab] logits for long texts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .events import ContinuationScore


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of logits [n, vocab] and target ids [n]: (log p(target) [n] float64, target is the
    argmax [n] bool). The normaliser is computed in float64, as transformers' log_softmax would."""
    rows = np.arange(targets.shape[0])
    peak = logits.max(axis=-1, keepdims=True)
    shifted = (logits - peak).astype(np.float64)
    normaliser = np.log(np.exp(shifted).sum(axis=-1))
    return shifted[rows, targets] - normaliser, logits.argmax(axis=-1) == targets


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
