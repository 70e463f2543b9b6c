"""Forward passes of the decoder graph: prefill a prompt, then one token at a time.

A runner owns the KV cache of the sequence being generated. `GqaRunner` is the fast path (cache
updated in place, every decode-step input and output bound once to fixed numpy buffers);
`PlainRunner` drives the portable graph whose past is concatenated inside it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnxruntime as ort

from .kv_cache import ConcatKVCache, InPlaceKVCache
from .errors import PackageError
from .manifest import Manifest


class Runner(Protocol):
    length: int
    """Positions in the cache (prompt and generated tokens so far)."""

    def reset(self, capacity: int) -> None:
        """Start a new sequence that will hold at most `capacity` positions."""

    def prefill(self, ids: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        """Run the prompt ids [sequence]; logits of the last position [vocab] or all [sequence, vocab]."""

    def step(self, token: int) -> np.ndarray:
        """Append one token; its logits [vocab]. The array is reused by the next step."""


def make_runner(session: ort.InferenceSession, manifest: Manifest) -> Runner:
    _check_graph_names(session, manifest)
    if manifest.graph.attention == "gqa":
        return GqaRunner(session, manifest)
    return PlainRunner(session, manifest)


def _check_graph_names(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The graph must have every input and output the manifest names, or nothing can run."""
    g = manifest.graph
    inputs = [g.input_ids, g.position_ids, g.logits_positions]
    if g.attention == "gqa":
        inputs += [g.seqlens_k, g.total_sequence_length, g.local_seqlens_k, g.local_total_sequence_length]
    outputs = [g.logits]
    for layer in range(manifest.model.num_layers):
        for past, present in g.cache_pairs(layer):
            inputs.append(past)
            outputs.append(present)
    missing = sorted(set(inputs) - {i.name for i in session.get_inputs()}) + \
        sorted(set(outputs) - {o.name for o in session.get_outputs()})
    if missing:
        raise PackageError(f"the model graph does not match its manifest (missing {', '.join(missing[:4])}"
                           f"{', ...' if len(missing) > 4 else ''}): re-export the package with this neoedge")


class GqaRunner:
    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        self._session = session
        self._model = manifest.model
        self._graph = manifest.graph
        self._cache: InPlaceKVCache | None = None
        # Decode-step inputs and output live in these arrays for the runner's lifetime; a step writes
        # a few scalars into them and runs: no allocation, no copy of the cache.
        self._ids = np.zeros((1, 1), np.int64)
        self._positions = np.zeros((1, 1), np.int64)
        self._logits_positions = np.zeros((1,), np.int64)
        # GroupQueryAttention's lengths: index of the last valid cache position, and the total,
        # for the global layers' cache and for the local layers' bounded one.
        self._seqlens_k = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._local_seqlens_k = np.zeros((1,), np.int32)
        self._local_total = np.zeros((), np.int32)
        self._logits = np.zeros((1, 1, self._model.vocab_size), np.float32)
        self._last_logits = self._logits[0, 0]
        self._step_binding: ort.IOBinding | None = None

    @property
    def length(self) -> int:
        return self._cache.length if self._cache is not None else 0

    def reset(self, capacity: int) -> None:
        self._cache = InPlaceKVCache(self._model, self._graph, capacity)
        self._step_binding = self._bind(self._ids, self._positions, self._logits_positions, self._logits)

    def _bind(self, ids: np.ndarray, positions: np.ndarray, logits_positions: np.ndarray,
              logits: np.ndarray | None) -> ort.IOBinding:
        g = self._graph
        binding = self._session.io_binding()
        for name, array in ((g.input_ids, ids), (g.position_ids, positions),
                            (g.logits_positions, logits_positions), (g.seqlens_k, self._seqlens_k),
                            (g.total_sequence_length, self._total), (g.local_seqlens_k, self._local_seqlens_k),
                            (g.local_total_sequence_length, self._local_total)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        if logits is None:
            binding.bind_output(g.logits, "cpu")
        else:
            binding.bind_ortvalue_output(g.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        self._cache.bind(binding)
        return binding

    def _set_lengths(self, count: int) -> None:
        cache = self._cache
        cache.make_room(count)
        self._seqlens_k[0] = cache.length + count - 1
        self._total[...] = cache.length + count
        self._local_seqlens_k[0] = cache.local_length + count - 1
        self._local_total[...] = cache.local_length + count

    def prefill(self, ids: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("reset() must start a sequence before prefill()")
        # Long prompts go through in chunks, so the local layers' bounded buffers can slide between.
        chunk = self._cache.chunk
        parts = []
        for offset in range(0, ids.shape[0], chunk):
            part = ids[offset: offset + chunk].astype(np.int64, copy=False).reshape(1, -1)
            count = part.shape[1]
            start = self._cache.length
            positions = np.arange(start, start + count, dtype=np.int64).reshape(1, count)
            selected = np.arange(count, dtype=np.int64) if all_logits else np.array([count - 1], np.int64)
            self._set_lengths(count)
            binding = self._bind(part, positions, selected, None if all_logits else self._logits)
            self._session.run_with_iobinding(binding)
            self._cache.advance(count)
            if all_logits:
                parts.append(binding.get_outputs()[0].numpy()[0])
        if all_logits:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._last_logits

    def step(self, token: int) -> np.ndarray:
        self._ids[0, 0] = token
        self._positions[0, 0] = self._cache.length
        self._set_lengths(1)
        self._session.run_with_iobinding(self._step_binding)
        self._cache.advance(1)
        return self._last_logits


class PlainRunner:
    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        self._session = session
        self._model = manifest.model
        self._graph = manifest.graph
        self._output_names = [o.name for o in session.get_outputs()]
        self._cache = ConcatKVCache(self._model, self._graph)
        self.length = 0

    def reset(self, capacity: int) -> None:
        self._cache = ConcatKVCache(self._model, self._graph)
        self.length = 0

    def prefill(self, ids: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        count = ids.shape[0]
        g = self._graph
        feeds = {
            g.input_ids: ids.reshape(1, count).astype(np.int64, copy=False),
            g.position_ids: np.arange(self.length, self.length + count, dtype=np.int64).reshape(1, count),
            g.logits_positions: np.arange(count, dtype=np.int64) if all_logits
            else np.array([count - 1], np.int64),
            **self._cache.past,
        }
        outputs = dict(zip(self._output_names, self._session.run(None, feeds)))
        self._cache.update(outputs, count)
        self.length = self._cache.length
        logits = outputs[g.logits][0]
        return logits if all_logits else logits[0]

    def step(self, token: int) -> np.ndarray:
        return self.prefill(np.array([token], np.int64))
