"""The per-layer key/value caches of one sequence, one class per attention implementation of the graph.

A cache belongs to exactly one sequence. It knows which positions it holds, and can be rewound,
copied (fork), checkpointed and turned into arrays (save) without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .manifest import GraphInfo, ModelInfo


def local_chunk(window_size: int) -> int:
    """Most positions one forward pass may add (the prefill chunk)."""
    return max(16, window_size // 2)


@dataclass(frozen=True)
class LocalCheckpoint:
    """The local layers' buffers at one moment: with the global layers' positions below `length`
    untouched, restoring it returns the cache exactly to that moment."""

    length: int
    local_length: int
    buffers: tuple[np.ndarray, ...]


class InPlaceKVCache:
    """Preallocated caches that GroupQueryAttention updates in place.

    Each layer's buffer is bound as both the past input and the present output of the graph, so a
    decode step writes one new position and copies nothing.

    Global layers get `capacity` positions. A local layer never looks further back than
    window_size - 1 positions, so its buffer is bounded: window_size - 1 + `margin` + `chunk` positions.
    When the next forward pass would overflow it, the last window_size - 1 + `margin` positions slide
    to the front (one small copy every `chunk` steps). The margin is what lets a sequence rewind a
    few tokens (regenerate a reply, drop a stop string) without recomputing anything: GPT-Neo's local
    keys at a position depend on everything before it, so a position that slid out cannot be
    restored except by running the sequence again. For gpt-neo-125m at 2048 tokens the cache is ~62%
    of a full one.
    """

    def __init__(self, model: ModelInfo, graph: GraphInfo, capacity: int) -> None:
        self.capacity = capacity
        self.chunk = local_chunk(model.window_size)
        self.keep = model.window_size - 1
        self.margin = self.chunk
        self.local_capacity = min(capacity, self.keep + self.margin + self.chunk)
        self.length = 0  # positions filled so far (absolute)
        self.local_length = 0  # positions held in the local layers' buffers
        self.dtype = np.int8 if graph.kv_cache == "int8" else np.float32
        self._model, self._graph = model, graph
        # (batch, heads, positions, head_size), in graph order: key then value of each layer.
        self.arrays: list[np.ndarray] = []
        self._local: list[np.ndarray] = []
        for kind in model.attention_layers:
            positions = self.local_capacity if kind == "local" else capacity
            shape = (1, model.num_heads, positions, model.head_size)
            # np.zeros maps untouched pages lazily: a large capacity costs memory only as it fills.
            pair = [np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)]
            self.arrays += pair
            if kind == "local":
                self._local += pair
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        self._names = [pair for layer in range(model.num_layers) for pair in graph.cache_pairs(layer)]

    @property
    def local_start(self) -> int:
        """Absolute position held in slot 0 of the local buffers."""
        return self.length - self.local_length

    def nbytes_used(self) -> int:
        """Bytes of cache this sequence's positions occupy (what it adds to memory)."""
        per_position = self._model.num_heads * self._model.head_size * np.dtype(self.dtype).itemsize * 2
        local = self._model.attention_layers.count("local")
        return per_position * ((self._model.num_layers - local) * self.length + local * self.local_length)

    def bind(self, binding: ort.IOBinding) -> None:
        for (past, present), value in zip(self._names, self._values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def make_room(self, count: int) -> None:
        """Ensure `count` (<= chunk) new positions fit the local buffers."""
        if count > self.chunk and self.local_capacity < self.capacity:
            raise ValueError(f"at most {self.chunk} positions per forward pass, got {count}")
        if self.local_length + count > self.local_capacity:
            kept = self.keep + self.margin
            start = self.local_length - kept
            for buffer in self._local:
                buffer[:, :, :kept] = buffer[:, :, start: self.local_length]
            self.local_length = kept

    def advance(self, count: int) -> None:
        self.length += count
        self.local_length += count

    # -- rewind, fork, checkpoint -------------------------------------------------------------------
    def can_rewind(self, length: int) -> bool:
        """Whether rewinding to `length` positions needs no recomputation: the local layers still
        hold the window before it."""
        return 0 <= length <= self.length and max(0, length - self.keep) >= self.local_start

    def rewind(self, length: int) -> None:
        if not self.can_rewind(length):
            raise ValueError(f"cannot rewind the cache from {self.length} to {length} positions in place")
        self.local_length = length - self.local_start
        self.length = length

    def copy(self) -> InPlaceKVCache:
        """An independent cache holding the same positions (only the filled part is copied)."""
        other = InPlaceKVCache(self._model, self._graph, self.capacity)
        for kind, (mine, theirs) in zip(self._kinds(), zip(self.arrays, other.arrays)):
            filled = self.local_length if kind == "local" else self.length
            theirs[:, :, :filled] = mine[:, :, :filled]
        other.length, other.local_length = self.length, self.local_length
        return other

    def checkpoint(self) -> LocalCheckpoint:
        return LocalCheckpoint(self.length, self.local_length,
                               tuple(b[:, :, : self.local_length].copy() for b in self._local))

    def restore(self, checkpoint: LocalCheckpoint) -> None:
        """Return to `checkpoint`, provided no position below its length was written since."""
        for buffer, saved in zip(self._local, checkpoint.buffers):
            buffer[:, :, : checkpoint.local_length] = saved
        self.length, self.local_length = checkpoint.length, checkpoint.local_length

    def _kinds(self) -> list[str]:
        return [kind for kind in self._model.attention_layers for _ in range(2)]

    # -- state files --------------------------------------------------------------------------------
    def filled(self) -> list[np.ndarray]:
        """The filled part of every buffer, in graph order (views)."""
        return [a[:, :, : (self.local_length if kind == "local" else self.length)]
                for kind, a in zip(self._kinds(), self.arrays)]

    def load_filled(self, length: int, local_length: int, arrays: list[np.ndarray]) -> None:
        for kind, mine, saved in zip(self._kinds(), self.arrays, arrays):
            filled = local_length if kind == "local" else length
            if saved.shape != (1, mine.shape[1], filled, mine.shape[3]) or saved.dtype != mine.dtype:
                raise ValueError(f"cache array of shape {saved.shape} {saved.dtype} does not fit "
                                 f"{(1, mine.shape[1], filled, mine.shape[3])} {mine.dtype}")
            mine[:, :, :filled] = saved
        self.length, self.local_length = length, local_length


class ConcatKVCache:
    """The past as separate arrays, replaced by the graph's (concatenated) presents each step."""

    def __init__(self, model: ModelInfo, graph: GraphInfo) -> None:
        empty = np.zeros((1, model.num_heads, 0, model.head_size), np.float32)
        self.length = 0
        self.past: dict[str, np.ndarray] = {}
        # present output name -> past input name, in the graph's output order
        self.present_to_past: dict[str, str] = {}
        for layer in range(model.num_layers):
            for past, present in graph.cache_pairs(layer):
                self.past[past] = empty
                self.present_to_past[present] = past

    def nbytes_used(self) -> int:
        return sum(a.nbytes for a in self.past.values())

    def update(self, presents: dict[str, np.ndarray], new_positions: int) -> None:
        for present, past in self.present_to_past.items():
            self.past[past] = presents[present]
        self.length += new_positions

    def can_rewind(self, length: int) -> bool:
        return 0 <= length <= self.length

    def rewind(self, length: int) -> None:
        if not self.can_rewind(length):
            raise ValueError(f"cannot rewind the cache from {self.length} to {length} positions")
        self.past = {name: a[:, :, :length] for name, a in self.past.items()}
        self.length = length

    def copy(self) -> ConcatKVCache:
        # The graph returns new arrays every step and nothing writes into them: sharing is safe.
        other = object.__new__(ConcatKVCache)
        other.length, other.past, other.present_to_past = self.length, dict(self.past), self.present_to_past
        return other

    def checkpoint(self) -> ConcatKVCache:
        return self.copy()

    def restore(self, checkpoint: ConcatKVCache) -> None:
        self.length, self.past = checkpoint.length, dict(checkpoint.past)

    def filled(self) -> list[np.ndarray]:
        return list(self.past.values())

    def load_filled(self, length: int, local_length: int, arrays: list[np.ndarray]) -> None:
        for name, saved in zip(list(self.past), arrays):
            expected = self.past[name].shape[:2] + (length,) + self.past[name].shape[3:]
            if saved.shape != expected or saved.dtype != np.float32:
                raise ValueError(f"cache array of shape {saved.shape} {saved.dtype} does not fit {expected}")
            self.past[name] = np.ascontiguousarray(saved)
        self.length = length
