"""Scoring several contexts in one forward pass: evaluation harnesses send thousands of short ones.

The first pass is shared: each row is a context followed by its first continuation (all but that
continuation's last token), right-padded, every row's length in `seqlens_k`, logits computed only
at the positions some row needs (`logits_positions` is shared by the rows, so rows of similar
lengths are batched together). The other continuations of a context then run on its row with the
context as past, writing over the previous continuation's positions, which nothing reads any more:
- on neoedge's Attention kernel, one pass per round for every row (the k-th continuation of each
  context together, right-padded);
- on onnxruntime's GroupQueryAttention (1.32, CPU), which runs a multi-token pass over several
  rows only when none of them has a past (see batch.py), one pass per continuation.

Rows hold every position in every layer (no bounded local window, no sliding): the local layers'
window is the op's `local_window_size` either way, and a batch's rows are short.

fp32 packages score as one context at a time does up to fp32 rounding: a pass over several rows
sums in another order than a one-row pass (≤ 2e-7 per token measured on the tiny models), so
accuracies and greedy checks agree but the logprobs are not bit-equal. With an int8 KV cache (quantized
packages) attention reads the exact keys of a pass's own positions and the int8 ones of earlier
passes, so scores depend on how the work is split into passes, by the cache's rounding (on the
trained tiny model ≤ 1.4e-6 per token between the two paths).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import onnxruntime as ort

from .events import ContinuationScore
from .kv_cache import lazy_zeros
from .runner import GqaRunner, _run, bind_cache_rows, bind_gqa_inputs
from .scoring import log_softmax_at

LOGITS_BUDGET = 256 * 2**20
"""Most bytes of logits one shared pass may return (rows x positions x vocabulary x 4)."""


class ContextBatch:
    """Reusable buffers for batches of up to `rows` rows of at most `width` positions."""

    def __init__(self, runner: GqaRunner, rows: int, width: int) -> None:
        model, graph = runner.model, runner.graph
        self._session, self._graph = runner.session, graph
        self._batched_past = runner.batched_past
        self.rows, self.width, self.vocab = rows, width, model.vocab_size
        dtype = np.int8 if graph.kv_cache == "int8" else np.float32
        # (rows, heads, positions, head_size) per layer, key then value; pages are taken only where written.
        self._arrays = [lazy_zeros((rows, model.num_heads, width, model.head_size), dtype)
                        for _ in range(2 * model.num_layers)]
        self._names = [pair for layer in range(model.num_layers) for pair in graph.cache_pairs(layer)]
        # Every pass's logits, grown as needed and reused: a fresh array of tens of MB per pass cost
        # a page fault per 4 KB when onnxruntime first wrote it (the kernel zeroing pages was 4% of a
        # multiple-choice task's time). Every element is written by the pass, and what a later pass
        # needs (a row's first logits) is taken out by indexing, a copy, before it runs.
        self._logits_buffer = np.empty(0, np.float32)

    def _logits(self, shape: tuple[int, int, int]) -> np.ndarray:
        size = shape[0] * shape[1] * shape[2]
        if self._logits_buffer.size < size:
            self._logits_buffer = np.empty(size, np.float32)
        return self._logits_buffer[:size].reshape(shape)

    def _bind(self, rows: slice, ids: np.ndarray, positions: np.ndarray, logits_positions: np.ndarray,
              seqlens: np.ndarray, total: np.ndarray, logits: np.ndarray) -> ort.IOBinding:
        binding = self._session.io_binding()
        # Local layers see the same full-length rows as global ones: the same lengths for both.
        bind_gqa_inputs(binding, self._graph, ids, positions, logits_positions, seqlens, total, seqlens, total)
        binding.bind_ortvalue_output(self._graph.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        bind_cache_rows(binding, self._names, self._arrays, rows)
        return binding

    def score(self, contexts: Seq[Seq[int]], continuations: Seq[Seq[Seq[int]]],
              run_options: ort.RunOptions | None = None) -> list[list[ContinuationScore]]:
        """For each context (at most `rows`), the scores of its continuations (each non-empty;
        context + first continuation - 1 and context + any continuation - 1 at most `width`)."""
        count = len(contexts)
        lengths = [len(c) for c in contexts]
        firsts = [conts[0] for conts in continuations]
        rows = [list(c) + list(f[:-1]) for c, f in zip(contexts, firsts)]
        width = max(len(r) for r in rows)
        if count > self.rows or width > self.width or any(
                n + len(cont) - 1 > self.width for n, conts in zip(lengths, continuations) for cont in conts):
            raise ValueError("batch larger than the buffers")
        ids = np.zeros((count, width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (count, width)).copy()
        # Row i needs logits at positions lengths[i]-1 ... len(rows[i])-1 (each predicts the next token).
        needed = sorted({p for n, row in zip(lengths, rows) for p in range(n - 1, len(row))})
        column = {p: k for k, p in enumerate(needed)}
        logits = self._logits((count, len(needed), self.vocab))
        seqlens = np.array([len(r) - 1 for r in rows], np.int32)
        _run(self._session, self._bind(slice(0, count), ids, positions, np.asarray(needed, np.int64), seqlens,
                                       np.array(width, np.int32), logits), run_options)
        out: list[list[ContinuationScore]] = []
        first_logits = []
        for i, (n, conts) in enumerate(zip(lengths, continuations)):
            row_logits = logits[i, [column[p] for p in range(n - 1, len(rows[i]))]]
            first_logits.append(row_logits[:1])
            out.append([_score(row_logits, conts[0])])
        # Round k scores every context's k-th continuation: the single-token ones from the context's
        # own logits, the longer ones in one pass over all rows where the attention allows it.
        for k in range(1, max(len(conts) for conts in continuations)):
            longer = {i: np.asarray(conts[k][:-1], np.int64) for i, conts in enumerate(continuations)
                      if len(conts) > k and len(conts[k]) > 1}
            kept = {i for i, conts in enumerate(continuations) if any(len(c) > 1 for c in conts[k:])}
            rests = self._extend_rows(lengths, longer, kept, run_options) if self._batched_past else None
            if rests is None:
                rests = {i: self._extend(i, lengths[i], ids, run_options) for i, ids in longer.items()}
            for i, conts in enumerate(continuations):
                if len(conts) > k:
                    scored = first_logits[i] if i not in rests else np.concatenate([first_logits[i], rests[i]])
                    out[i].append(_score(scored, conts[k]))
        return out

    def _extend_rows(self, lengths: list[int], ids: dict[int, np.ndarray], kept: set[int],
                     run_options: ort.RunOptions | None) -> dict[int, np.ndarray] | None:
        """One pass over rows [0, len(lengths)): `ids[i]` after row i's first `lengths[i]` positions,
        right-padded to the longest (the padding comes after a row's own tokens, which cannot see
        it). Rows without ids take the padding alone: after their context if they are `kept` (their
        later continuations need it), else over it. Logits of each row's own tokens; None if the pass
        would not fit the buffers or the logits budget (the rows then run one by one)."""
        if not ids:
            return {}
        count, new = len(lengths), max(len(t) for t in ids.values())
        starts = [n if i in ids or i in kept else 0 for i, n in enumerate(lengths)]
        if max(starts) + new > self.width or count * new * self.vocab * 4 > LOGITS_BUDGET:
            return None
        batch = np.zeros((count, new), np.int64)
        for i, tokens in ids.items():
            batch[i, : len(tokens)] = tokens
        positions = np.asarray(starts, np.int64)[:, None] + np.arange(new, dtype=np.int64)
        logits = self._logits((count, new, self.vocab))
        seqlens = np.asarray(starts, np.int32) + (new - 1)
        _run(self._session, self._bind(slice(0, count), batch, positions, np.arange(new, dtype=np.int64), seqlens,
                                       np.array(int(seqlens.max()) + 1, np.int32), logits), run_options)
        return {i: logits[i, : len(tokens)] for i, tokens in ids.items()}

    def _extend(self, row: int, length: int, ids: np.ndarray, run_options: ort.RunOptions | None) -> np.ndarray:
        """Run `ids` on one row after its first `length` positions; logits at every one of them."""
        count = ids.shape[0]
        logits = np.zeros((1, count, self.vocab), np.float32)
        binding = self._bind(slice(row, row + 1), ids.reshape(1, count),
                             np.arange(length, length + count, dtype=np.int64).reshape(1, count),
                             np.arange(count, dtype=np.int64), np.array([length + count - 1], np.int32),
                             np.array(length + count, np.int32), logits)
        _run(self._session, binding, run_options)
        return logits[0]


def _score(logits: np.ndarray, continuation: Seq[int]) -> ContinuationScore:
    targets = np.asarray(continuation, np.int64)
    logprobs, greedy = log_softmax_at(logits, targets)
    return ContinuationScore(tokens=tuple(int(t) for t in continuation),
                             logprobs=tuple(float(v) for v in logprobs), greedy=bool(greedy.all()))
