"""Forward passes of the decoder graph over one sequence's state.

A runner is shared by every sequence of a model and holds no sequence state: `new_state()` makes the
per-sequence part (KV cache, fixed input/output buffers), and `forward` / `step` run the graph on
it. `GqaRunner` is the fast path (cache updated in place, every decode-step input and output bound
once to fixed numpy buffers); `PlainRunner` drives the portable graph whose past is concatenated
inside it.
"""

from __future__ import annotations

from typing import Protocol, Union

import numpy as np
import onnxruntime as ort

from .errors import PackageError
from .graph_file import GraphFile
from .kernels import DOMAIN as KERNEL_DOMAIN
from .session import ORT_ERRORS, run_error
from .kv_cache import ConcatKVCache, InPlaceKVCache, local_chunk
from .manifest import GraphInfo, Manifest


class Terminated(Exception):
    """A forward pass was stopped by its RunOptions' terminate flag (a cancel). The state is as
    before the pass: nothing was advanced."""


class GqaState:
    """One sequence's part of the fast path: its cache and the buffers its decode step is bound to."""

    def __init__(self, runner: GqaRunner, capacity: int) -> None:
        self.cache = InPlaceKVCache(runner.model, runner.graph, capacity)
        # Decode-step inputs and output live in these arrays for the state's lifetime; a step writes
        # a few scalars into them and runs: no allocation, no copy of the cache.
        self.ids = np.zeros((1, 1), np.int64)
        self.positions = np.zeros((1, 1), np.int64)
        self.logits_positions = np.zeros((1,), np.int64)
        # GroupQueryAttention's lengths: index of the last valid cache position, and the total,
        # for the global layers' cache and for the local layers' bounded one.
        self.seqlens_k = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        self.local_seqlens_k = np.zeros((1,), np.int32)
        self.local_total = np.zeros((), np.int32)
        self.logits = np.zeros((1, 1, runner.model.vocab_size), np.float32)
        self.last_logits = self.logits[0, 0]
        self.step_binding = runner.bind(self, self.ids, self.positions, self.logits_positions, self.logits)

    @property
    def length(self) -> int:
        return self.cache.length


class PlainState:
    def __init__(self, runner: PlainRunner) -> None:
        self.cache = ConcatKVCache(runner.model, runner.graph)
        self.last_logits = np.zeros(runner.model.vocab_size, np.float32)

    @property
    def length(self) -> int:
        return self.cache.length


State = Union[GqaState, PlainState]


class Runner(Protocol):
    chunk: int
    """Most positions one forward pass takes."""

    def new_state(self, capacity: int) -> State:
        """Per-sequence state for a sequence of at most `capacity` positions."""

    def copy_state(self, state: State) -> State:
        """An independent state holding the same positions (fork)."""

    def forward(self, state: State, ids: np.ndarray, *, all_logits: bool = False,
                run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Append ids [count <= chunk]; logits of the last position [vocab] (a view reused by the next
        pass) or of every position [count, vocab]. Raises Terminated if run_options was terminated."""

    def step(self, state: State, token: int, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Append one token; its logits [vocab] (a view reused by the next pass)."""


def make_runner(session: ort.InferenceSession, manifest: Manifest, graph_path: str = "",
                graph: GraphFile | None = None) -> Runner:
    """The runner for `session`; `graph` is the file it was made from (what its nodes are)."""
    _check_graph_names(session, manifest)
    if manifest.graph.attention == "gqa":
        return GqaRunner(session, manifest, graph_path, batched_past=graph is not None and batches_over_a_past(graph))
    return PlainRunner(session, manifest, graph_path)


def batches_over_a_past(graph: GraphFile) -> bool:
    """Whether every attention node of `graph` runs a pass of several tokens on several rows that
    already have a past. neoedge's Attention kernel does; onnxruntime's GroupQueryAttention (1.32,
    CPU) refuses it ("batch_size must be 1 when sequence_length > 1 and past context is given")."""
    attention = [n for n in graph.nodes if n.op_type in ("Attention", "GroupQueryAttention")]
    return bool(attention) and all(n.op_type == "Attention" and n.domain == KERNEL_DOMAIN for n in attention)


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


# run_with_iobinding reports a failed run (a terminate flag included) as a plain RuntimeError.
RUN_ERRORS = (*ORT_ERRORS, RuntimeError)


def _run(session: ort.InferenceSession, binding: ort.IOBinding, run_options: ort.RunOptions | None,
         what: str = "a forward pass", where: str = "") -> None:
    try:
        session.run_with_iobinding(binding, run_options)
    except RUN_ERRORS as exc:  # onnxruntime raises its own exception types, not NeoedgeErrors
        if run_options is not None and run_options.terminate:
            raise Terminated() from exc
        raise run_error(exc, what, where) from exc


def bind_gqa_inputs(binding: ort.IOBinding, graph: GraphInfo, ids: np.ndarray, positions: np.ndarray,
                    logits_positions: np.ndarray, seqlens: np.ndarray, total: np.ndarray,
                    local_seqlens: np.ndarray, local_total: np.ndarray) -> None:
    """The inputs of a GroupQueryAttention pass other than the cache, bound to the given arrays
    (which must outlive the binding: onnxruntime reads them in place)."""
    for name, array in ((graph.input_ids, ids), (graph.position_ids, positions),
                        (graph.logits_positions, logits_positions), (graph.seqlens_k, seqlens),
                        (graph.total_sequence_length, total), (graph.local_seqlens_k, local_seqlens),
                        (graph.local_total_sequence_length, local_total)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))


def bind_cache_rows(binding: ort.IOBinding, names: list[tuple[str, str]], arrays: list[np.ndarray],
                    rows: slice) -> None:
    """Rows `rows` of each (past, present) cache array as both input and output: the op updates
    them in place."""
    for (past, present), array in zip(names, arrays):
        value = ort.OrtValue.ortvalue_from_numpy(array[rows])
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)


class GqaRunner:
    def __init__(self, session: ort.InferenceSession, manifest: Manifest, graph_path: str = "", *,
                 batched_past: bool = False) -> None:
        self.session = session
        # A pass may give several rows with a past the same number of new tokens (batches_over_a_past).
        self.batched_past = batched_past
        self.graph_path = str(graph_path)
        self.model = manifest.model
        self.graph = manifest.graph
        self.chunk = local_chunk(self.model.window_size)

    def new_state(self, capacity: int) -> GqaState:
        return GqaState(self, capacity)

    def copy_state(self, state: GqaState) -> GqaState:
        other = GqaState.__new__(GqaState)
        other.__dict__.update({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in state.__dict__.items()})
        other.cache = state.cache.copy()
        other.last_logits = other.logits[0, 0]
        other.step_binding = self.bind(other, other.ids, other.positions, other.logits_positions, other.logits)
        return other

    def bind(self, state: GqaState, ids: np.ndarray, positions: np.ndarray, logits_positions: np.ndarray,
             logits: np.ndarray | None) -> ort.IOBinding:
        g = self.graph
        binding = self.session.io_binding()
        bind_gqa_inputs(binding, g, ids, positions, logits_positions, state.seqlens_k, state.total,
                        state.local_seqlens_k, state.local_total)
        if logits is None:
            binding.bind_output(g.logits, "cpu")
        else:
            binding.bind_ortvalue_output(g.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        state.cache.bind(binding)
        return binding

    def _set_lengths(self, state: GqaState, count: int) -> None:
        cache = state.cache
        cache.make_room(count)
        state.seqlens_k[0] = cache.length + count - 1
        state.total[...] = cache.length + count
        state.local_seqlens_k[0] = cache.local_length + count - 1
        state.local_total[...] = cache.local_length + count

    def forward(self, state: GqaState, ids: np.ndarray, *, all_logits: bool = False,
                run_options: ort.RunOptions | None = None) -> np.ndarray:
        count = ids.shape[0]
        start = state.cache.length
        part = ids.astype(np.int64, copy=False).reshape(1, count)
        positions = np.arange(start, start + count, dtype=np.int64).reshape(1, count)
        selected = np.arange(count, dtype=np.int64) if all_logits else np.array([count - 1], np.int64)
        self._set_lengths(state, count)
        binding = self.bind(state, part, positions, selected, None if all_logits else state.logits)
        _run(self.session, binding, run_options, f"a pass over {count} tokens at position {start}", self.graph_path)
        state.cache.advance(count)
        return binding.get_outputs()[0].numpy()[0] if all_logits else state.last_logits

    def step(self, state: GqaState, token: int, run_options: ort.RunOptions | None = None) -> np.ndarray:
        state.ids[0, 0] = token
        state.positions[0, 0] = state.cache.length
        self._set_lengths(state, 1)
        _run(self.session, state.step_binding, run_options, f"the decode step at position {state.cache.length}",
             self.graph_path)
        state.cache.advance(1)
        return state.last_logits


class PlainRunner:
    def __init__(self, session: ort.InferenceSession, manifest: Manifest, graph_path: str = "") -> None:
        self.session = session
        self.graph_path = str(graph_path)
        self.model = manifest.model
        self.graph = manifest.graph
        self.chunk = local_chunk(self.model.window_size)
        self._output_names = [o.name for o in session.get_outputs()]

    def new_state(self, capacity: int) -> PlainState:
        return PlainState(self)

    def copy_state(self, state: PlainState) -> PlainState:
        other = PlainState.__new__(PlainState)
        other.cache = state.cache.copy()
        other.last_logits = state.last_logits.copy()
        return other

    def forward(self, state: PlainState, ids: np.ndarray, *, all_logits: bool = False,
                run_options: ort.RunOptions | None = None) -> np.ndarray:
        count = ids.shape[0]
        g = self.graph
        length = state.cache.length
        feeds = {
            g.input_ids: ids.reshape(1, count).astype(np.int64, copy=False),
            g.position_ids: np.arange(length, length + count, dtype=np.int64).reshape(1, count),
            g.logits_positions: np.arange(count, dtype=np.int64) if all_logits
            else np.array([count - 1], np.int64),
            **state.cache.past,
        }
        try:
            values = self.session.run(None, feeds, run_options)
        except RUN_ERRORS as exc:
            if run_options is not None and run_options.terminate:
                raise Terminated() from exc
            raise run_error(exc, f"a pass over {count} tokens at position {length}", self.graph_path) from exc
        outputs = dict(zip(self._output_names, values))
        state.cache.update(outputs, count)
        logits = outputs[g.logits][0]
        if all_logits:
            return logits
        np.copyto(state.last_logits, logits[0])
        return state.last_logits

    def step(self, state: PlainState, token: int, run_options: ort.RunOptions | None = None) -> np.ndarray:
        return self.forward(state, np.array([token], np.int64), run_options=run_options)
