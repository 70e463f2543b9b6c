"""Batched decode: several sequences' caches side by side, one forward pass per step for all.

A `RowPool` holds up to `rows` sequences ("rows") of one model. Rows 0..active-1 are in use; a
row that leaves is filled by the last one, so the rows in use are always a contiguous prefix of the
buffers, which lets one forward pass bind them as a single [active, heads, positions, head_size]
view. Each row has its own length, and GroupQueryAttention reads them per row (`seqlens_k`), so the
rows' prompts and progress are ragged; each row's local-layer window slides on its own.

GroupQueryAttention (onnxruntime 1.32, CPU) runs a multi-token pass for several rows only when none
of them has a past ("batch_size must be 1 when sequence_length > 1 and past context is given"): so
prompts that fit one chunk are prefilled together into fresh rows, longer ones chunk by chunk on
their own row, and every decode step runs all rows at once.

`SerialPool` offers the same interface over independent sequences for graphs that cannot batch
(the "plain" attention graph, whose concatenated past must be equally long in every row).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnxruntime as ort

from .kv_cache import lazy_zeros, local_chunk
from .runner import GqaRunner, Runner, State, _run, bind_cache_rows, bind_gqa_inputs


class RowPool(Protocol):
    rows: int
    active: int
    chunk: int
    capacity: int

    def length(self, row: int) -> int:
        """Positions row `row` holds."""

    def add(self) -> int:
        """A fresh (empty) row; returns its index (== active - 1 afterwards)."""

    def remove(self, row: int) -> int | None:
        """Free `row`; the last row moves into its place. Returns the index that moved (now `row`)."""

    def prefill(self, row: int, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Append ids [count <= chunk] to one row; its last position's logits [vocab]."""

    def prefill_fresh(self, first: int, prompts: list[np.ndarray]) -> list[np.ndarray]:
        """Prompts (each <= chunk) into the fresh rows first, first+1, ... in one pass; last logits each."""

    def decode(self, tokens: np.ndarray, advance: np.ndarray) -> np.ndarray:
        """One token for each active row [active]; logits [active, vocab] (reused by the next step).
        Rows where `advance` is False (still being prefilled) take a placeholder: its keys are
        written where the row's next position will go and overwritten by it, the row stays as it was."""


class GqaPool:
    """Batched caches for the GroupQueryAttention graph (see the module docstring)."""

    def __init__(self, runner: GqaRunner, rows: int, capacity: int) -> None:
        model, graph = runner.model, runner.graph
        self._runner, self._session, self._graph = runner, runner.session, graph
        self.rows, self.capacity, self.active = rows, capacity, 0
        self.chunk = local_chunk(model.window_size)
        self.keep = model.window_size - 1
        self.margin = self.chunk
        self.local_capacity = min(capacity, self.keep + self.margin + self.chunk)
        dtype = np.int8 if graph.kv_cache == "int8" else np.float32
        self._arrays: list[np.ndarray] = []
        self._local: list[np.ndarray] = []
        for kind in model.attention_layers:
            positions = self.local_capacity if kind == "local" else capacity
            # (rows, heads, positions, head_size); untouched pages cost no memory until a row fills them.
            pair = [lazy_zeros((rows, model.num_heads, positions, model.head_size), dtype) for _ in range(2)]
            self._arrays += pair
            if kind == "local":
                self._local += pair
        self._kinds = [kind for kind in model.attention_layers for _ in range(2)]
        self._names = [pair for layer in range(model.num_layers) for pair in graph.cache_pairs(layer)]
        self._lengths = np.zeros(rows, np.int64)
        self._local_lengths = np.zeros(rows, np.int64)
        # Decode-step buffers for all rows; a step binds their first `active` rows.
        self._ids = np.zeros((rows, 1), np.int64)
        self._positions = np.zeros((rows, 1), np.int64)
        self._seqlens_k = np.zeros(rows, np.int32)
        self._local_seqlens_k = np.zeros(rows, np.int32)
        self._total = np.zeros((), np.int32)
        self._local_total = np.zeros((), np.int32)
        self._zero = np.zeros(1, np.int64)
        self._logits = np.zeros((rows, 1, model.vocab_size), np.float32)
        self._row_logits = np.zeros((1, 1, model.vocab_size), np.float32)
        self._decode_binding: ort.IOBinding | None = None
        self._bound_rows = -1

    def length(self, row: int) -> int:
        return int(self._lengths[row])

    def nbytes_used(self, row: int) -> int:
        total = 0
        for kind, array in zip(self._kinds, self._arrays):
            filled = self._local_lengths[row] if kind == "local" else self._lengths[row]
            total += int(filled) * array.shape[1] * array.shape[3] * array.itemsize
        return total

    # -- rows ---------------------------------------------------------------------------------------
    def add(self) -> int:
        if self.active == self.rows:
            raise RuntimeError("no free row")
        row = self.active
        self._lengths[row] = self._local_lengths[row] = 0
        self.active += 1
        return row

    def remove(self, row: int) -> int | None:
        last = self.active - 1
        moved = None
        if row != last:
            for kind, array in zip(self._kinds, self._arrays):
                filled = self._local_lengths[last] if kind == "local" else self._lengths[last]
                array[row, :, :filled] = array[last, :, :filled]
            self._lengths[row], self._local_lengths[row] = self._lengths[last], self._local_lengths[last]
            moved = last
        self.active -= 1
        return moved

    def _make_room(self, row: int, count: int) -> None:
        if self._local_lengths[row] + count > self.local_capacity:
            kept = self.keep + self.margin
            start = int(self._local_lengths[row]) - kept
            for buffer in self._local:
                buffer[row, :, :kept] = buffer[row, :, start: start + kept]
            self._local_lengths[row] = kept

    def _bind(self, rows: slice, ids: np.ndarray, positions: np.ndarray, logits_positions: np.ndarray,
              seqlens: np.ndarray, total: np.ndarray, local_seqlens: np.ndarray, local_total: np.ndarray,
              logits: np.ndarray) -> ort.IOBinding:
        binding = self._session.io_binding()
        bind_gqa_inputs(binding, self._graph, ids, positions, logits_positions, seqlens, total, local_seqlens,
                        local_total)
        binding.bind_ortvalue_output(self._graph.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        bind_cache_rows(binding, self._names, self._arrays, rows)
        return binding

    # -- forward passes ---------------------------------------------------------------------------------
    def prefill(self, row: int, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        count = ids.shape[0]
        if count > self.chunk:
            raise ValueError(f"at most {self.chunk} positions per forward pass, got {count}")
        self._make_room(row, count)
        length, local = int(self._lengths[row]), int(self._local_lengths[row])
        binding = self._bind(
            slice(row, row + 1), ids.astype(np.int64, copy=False).reshape(1, count),
            np.arange(length, length + count, dtype=np.int64).reshape(1, count), np.array([count - 1], np.int64),
            np.array([length + count - 1], np.int32), np.array(length + count, np.int32),
            np.array([local + count - 1], np.int32), np.array(local + count, np.int32), self._row_logits)
        _run(self._session, binding, run_options)
        self._lengths[row] += count
        self._local_lengths[row] += count
        return self._row_logits[0, 0]

    def prefill_fresh(self, first: int, prompts: list[np.ndarray]) -> list[np.ndarray]:
        """One pass over several fresh rows: GroupQueryAttention's first-prompt mode, right-padded,
        each row's length in seqlens_k (the padding's keys land past the row's end and are ignored)."""
        count = len(prompts)
        width = max(p.shape[0] for p in prompts)
        if width > self.chunk or any(self._lengths[first + i] for i in range(count)):
            raise ValueError("prefill_fresh takes fresh rows and prompts of at most one chunk")
        ids = np.zeros((count, width), np.int64)
        for i, prompt in enumerate(prompts):
            ids[i, : prompt.shape[0]] = prompt
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (count, width)).copy()
        seqlens = np.array([p.shape[0] - 1 for p in prompts], np.int32)
        # The graph gathers the same positions in every row before lm_head: only the rows' last
        # positions (the distinct ones), not all `width` (lm_head over every position of every
        # prompt was ~40% of the pass and a [rows, width, vocab] buffer, 200 MB at 8 x 128 tokens).
        wanted, where = np.unique(seqlens.astype(np.int64), return_inverse=True)
        logits = np.zeros((count, wanted.shape[0], self._logits.shape[2]), np.float32)
        binding = self._bind(slice(first, first + count), ids, positions, wanted,
                             seqlens, np.array(width, np.int32), seqlens.copy(), np.array(width, np.int32), logits)
        _run(self._session, binding, None)
        for i, prompt in enumerate(prompts):
            self._lengths[first + i] = self._local_lengths[first + i] = prompt.shape[0]
        return [logits[i, where[i]] for i in range(count)]

    def decode(self, tokens: np.ndarray, advance: np.ndarray) -> np.ndarray:
        n = self.active
        for row in range(n):
            self._make_room(row, 1)
        self._ids[:n, 0] = tokens
        self._positions[:n, 0] = self._lengths[:n]
        self._seqlens_k[:n] = self._lengths[:n]
        self._local_seqlens_k[:n] = self._local_lengths[:n]
        self._total[...] = self._lengths[:n].max() + 1
        self._local_total[...] = self._local_lengths[:n].max() + 1
        if self._bound_rows != n:
            self._decode_binding = self._bind(
                slice(0, n), self._ids[:n], self._positions[:n], self._zero, self._seqlens_k[:n], self._total,
                self._local_seqlens_k[:n], self._local_total, self._logits[:n])
            self._bound_rows = n
        _run(self._session, self._decode_binding, None)
        self._lengths[:n] += advance
        self._local_lengths[:n] += advance
        return self._logits[:n, 0]


class SerialPool:
    """The RowPool interface over independent per-row states, run one row after another."""

    def __init__(self, runner: Runner, rows: int, capacity: int) -> None:
        self._runner = runner
        self.rows, self.capacity, self.active = rows, capacity, 0
        self.chunk = runner.chunk
        self._states: list[State] = []
        self._logits = np.zeros((rows, runner.model.vocab_size), np.float32)

    def length(self, row: int) -> int:
        return self._states[row].length

    def nbytes_used(self, row: int) -> int:
        return self._states[row].cache.nbytes_used()

    def add(self) -> int:
        if self.active == self.rows:
            raise RuntimeError("no free row")
        self._states.append(self._runner.new_state(self.capacity))
        self.active += 1
        return self.active - 1

    def remove(self, row: int) -> int | None:
        last = self.active - 1
        self._states[row] = self._states[last]
        self._states.pop()
        self.active -= 1
        return last if row != last else None

    def prefill(self, row: int, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        return self._runner.forward(self._states[row], ids, run_options=run_options)

    def prefill_fresh(self, first: int, prompts: list[np.ndarray]) -> list[np.ndarray]:
        return [self.prefill(first + i, p).copy() for i, p in enumerate(prompts)]

    def decode(self, tokens: np.ndarray, advance: np.ndarray) -> np.ndarray:
        for row in range(self.active):
            if advance[row]:
                self._logits[row] = self._runner.step(self._states[row], int(tokens[row]))
        return self._logits[: self.active]


def make_pool(runner: Runner, rows: int, capacity: int) -> RowPool:
    if isinstance(runner, GqaRunner):
        return GqaPool(runner, rows, capacity)
    return SerialPool(runner, rows, capacity)
