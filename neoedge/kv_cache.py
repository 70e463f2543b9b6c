"""The per-layer key/value caches, one class per attention implementation of the graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import GraphInfo, ModelInfo


def local_chunk(window_size: int) -> int:
    """Most positions one forward pass may add: a local layer's buffer holds window - 1 + this."""
    return max(16, window_size // 2)


class InPlaceKVCache:
    """Preallocated caches that GroupQueryAttention updates in place.

    Each layer's buffer is bound as both the past input and the present output of the graph, so a
    decode step writes one new position and copies nothing.

    Global layers get `capacity` positions. A local layer never looks further back than
    window_size - 1 positions, so its buffer is bounded: window_size - 1 + `chunk` positions, and when
    the next forward pass would overflow it, the last window_size - 1 positions slide to the front
    (one small copy every `chunk` steps). For gpt-neo-125m at 2048 tokens this is ~60% of a full cache.
    """

    def __init__(self, model: ModelInfo, graph: GraphInfo, capacity: int) -> None:
        self.capacity = capacity
        self.chunk = local_chunk(model.window_size)
        self.keep = model.window_size - 1
        self.local_capacity = min(capacity, self.keep + self.chunk)
        self.length = 0  # positions filled so far (absolute)
        self.local_length = 0  # positions held in the local layers' buffers
        self._local: list[np.ndarray] = []
        self._bindings = []
        dtype = np.int8 if graph.kv_cache == "int8" else np.float32
        for layer, kind in enumerate(model.attention_layers):
            positions = self.local_capacity if kind == "local" else capacity
            shape = (1, model.num_heads, positions, model.head_size)  # (batch, heads, positions, head_size)
            # np.zeros maps untouched pages lazily: a large capacity costs memory only as it fills.
            keys, values = np.zeros(shape, dtype), np.zeros(shape, dtype)
            if kind == "local":
                self._local += [keys, values]
            self._bindings += [(past, present, ort.OrtValue.ortvalue_from_numpy(buffer))
                               for (past, present), buffer in zip(graph.cache_pairs(layer), (keys, values))]
        self.nbytes = sum(value.numpy().nbytes for _, _, value in self._bindings)

    def bind(self, binding: ort.IOBinding) -> None:
        for past, present, value in self._bindings:
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def make_room(self, count: int) -> None:
        """Ensure `count` (<= chunk) new positions fit the local buffers."""
        if count > self.chunk and self.local_capacity < self.capacity:
            raise ValueError(f"at most {self.chunk} positions per forward pass, got {count}")
        if self.local_length + count > self.local_capacity:
            start = self.local_length - self.keep
            for buffer in self._local:
                buffer[:, :, : self.keep] = buffer[:, :, start: self.local_length]
            self.local_length = self.keep

    def advance(self, count: int) -> None:
        self.length += count
        self.local_length += count


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

    def update(self, presents: dict[str, np.ndarray], new_positions: int) -> None:
        for present, past in self.present_to_past.items():
            self.past[past] = presents[present]
        self.length += new_positions
