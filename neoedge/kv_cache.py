"""The per-layer key/value caches, one class per attention implementation of the graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import GraphInfo, ModelInfo


class InPlaceKVCache:
    """A preallocated cache of `capacity` positions that GroupQueryAttention updates in place.

    Each layer's buffer is bound as both the past input and the present output of the graph, so a
    decode step writes one new position and copies nothing.
    """

    def __init__(self, model: ModelInfo, graph: GraphInfo, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # positions filled so far
        shape = (1, model.num_heads, capacity, model.head_size)  # (batch, heads, capacity, head_size)
        # np.zeros maps untouched pages lazily: a large capacity costs memory only as it fills.
        self._buffers = [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(model.num_layers)
        ]
        self._bindings = [
            (
                (graph.cache_name(graph.past_key, layer), graph.cache_name(graph.present_key, layer),
                 ort.OrtValue.ortvalue_from_numpy(keys)),
                (graph.cache_name(graph.past_value, layer), graph.cache_name(graph.present_value, layer),
                 ort.OrtValue.ortvalue_from_numpy(values)),
            )
            for layer, (keys, values) in enumerate(self._buffers)
        ]

    def bind(self, binding: ort.IOBinding) -> None:
        for layer_bindings in self._bindings:
            for past, present, value in layer_bindings:
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)


class ConcatKVCache:
    """The past as separate arrays, replaced by the graph's (concatenated) presents each step."""

    def __init__(self, model: ModelInfo, graph: GraphInfo) -> None:
        empty = np.zeros((1, model.num_heads, 0, model.head_size), np.float32)
        self.length = 0
        self.past: dict[str, np.ndarray] = {}
        # present output name -> past input name, in the graph's output order
        self.present_to_past: dict[str, str] = {}
        for layer in range(model.num_layers):
            for past, present in ((graph.past_key, graph.present_key), (graph.past_value, graph.present_value)):
                self.past[graph.cache_name(past, layer)] = empty
                self.present_to_past[graph.cache_name(present, layer)] = graph.cache_name(past, layer)

    def update(self, presents: dict[str, np.ndarray], new_positions: int) -> None:
        for present, past in self.present_to_past.items():
            self.past[past] = presents[present]
        self.length += new_positions
