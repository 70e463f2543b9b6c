"""Load-time cross-checks: the manifest against the graph (the session's inputs and outputs, and what
the graph file holds) and against the tokenizer. Each mismatch is named: a package that loads runs
the model its manifest describes, with a tokenizer that fits it."""

from __future__ import annotations

from typing import Any

from .errors import GraphMismatchError, TokenizerMismatchError
from .graph_file import GraphFile
from .kernels import DOMAIN as KERNEL_DOMAIN
from .manifest import Manifest
from .tokenizer import Tokenizer

_ELEMENT_TYPES = {"float32": "tensor(float)", "int8": "tensor(int8)"}


def check_graph(session: Any, manifest: Manifest, graph: GraphFile | None = None) -> None:
    """The onnxruntime session (and, if given, the graph file it was made from) must be the graph
    the manifest describes: every input and output it names, no other input, their element types and
    ranks, and the dimensions the graph fixes (heads, head size, vocabulary, layers, attention
    window, positions)."""
    g, m = manifest.graph, manifest.model
    inputs = {value.name: value for value in session.get_inputs()}
    outputs = {value.name: value for value in session.get_outputs()}
    expected_inputs, expected_outputs = g.input_names(m.num_layers), g.output_names(m.num_layers)
    missing = [n for n in expected_inputs if n not in inputs] + [n for n in expected_outputs if n not in outputs]
    if missing:
        raise GraphMismatchError(f"the model graph does not match its manifest (missing {', '.join(missing[:4])}"
                                 f"{', ...' if len(missing) > 4 else ''}): re-export the package with this neoedge")
    extra = sorted(set(inputs) - set(expected_inputs))
    if extra:
        raise GraphMismatchError(f"the model graph needs input(s) its manifest does not name ({', '.join(extra[:4])}"
                                 f"{', ...' if len(extra) > 4 else ''}): a graph with more layers than "
                                 f"num_layers {m.num_layers}, or of another package?")

    def expect(value: Any, element: str, rank: int, fixed: dict[int, tuple[int, str]] | None = None) -> None:
        if value.type != element:
            raise GraphMismatchError(f"graph {value.name} holds {value.type}, the manifest needs {element}")
        if len(value.shape) != rank:
            raise GraphMismatchError(f"graph {value.name} has {len(value.shape)} dimensions, the runtime "
                                     f"feeds {rank}")
        for axis, (size, what) in (fixed or {}).items():
            actual = value.shape[axis]
            if isinstance(actual, int) and actual != size:
                raise GraphMismatchError(f"graph {value.name} has {actual} {what}, the manifest says {size} "
                                         f"(model.{_FIELD[what]})")

    for name in (g.input_ids, g.position_ids):
        expect(inputs[name], "tensor(int64)", 2)
    expect(inputs[g.logits_positions], "tensor(int64)", 1)
    if g.attention == "gqa":
        for name in (g.seqlens_k, g.local_seqlens_k):
            expect(inputs[name], "tensor(int32)", 1)
        for name in (g.total_sequence_length, g.local_total_sequence_length):
            expect(inputs[name], "tensor(int32)", 0)
    expect(outputs[g.logits], "tensor(float)", 3, {2: (m.vocab_size, "vocabulary entries")})
    cache = {1: (m.num_heads, "heads"), 3: (m.head_size, "channels per head")}
    for layer in range(m.num_layers):
        for past, present in g.cache_pairs(layer):
            expect(inputs[past], _ELEMENT_TYPES[g.kv_cache], 4, cache)
            expect(outputs[present], _ELEMENT_TYPES[g.kv_cache], 4, cache)
    if graph is not None:
        _check_graph_file(graph, manifest)


_FIELD = {"vocabulary entries": "vocab_size", "heads": "num_heads", "channels per head": "hidden_size / num_heads",
          "positions": "context_length", "channels": "hidden_size"}


_QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _check_quantization(graph: GraphFile, manifest: Manifest) -> None:
    """The weights the graph stores are the ones the manifest names: none quantized for "none",
    and for int8/int4 only nodes of its bits (weights or lm_head). A manifest that says fp32 over a
    quantized graph would be validated against the wrong bounds and described wrongly."""
    q = manifest.quantization
    nodes = [n for n in graph.nodes if n.op_type in _QUANTIZED_OPS]
    if q.scheme == "none":
        if nodes:
            raise GraphMismatchError(f"the graph holds quantized weights ({nodes[0].op_type}), the manifest "
                                     "says fp32 (quantization.scheme 'none')")
        return
    if not nodes:
        raise GraphMismatchError(f"the manifest says {q.scheme} weights (quantization.scheme), the graph "
                                 "holds no quantized ones")
    assert q.settings is not None
    allowed = {q.settings.bits, q.settings.lm_head_bits}
    found = sorted({n.ints["bits"] for n in nodes if "bits" in n.ints} - allowed)
    if found:
        raise GraphMismatchError(f"the graph holds {found[0]}-bit weights, the manifest says {q.settings.bits} "
                                 f"(lm_head {q.settings.lm_head_bits}; quantization.settings)")


def _check_graph_file(graph: GraphFile, manifest: Manifest) -> None:
    g, m = manifest.graph, manifest.model
    # Learned absolute positions: the table the position ids index.
    for node in graph.nodes:
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] == g.position_ids \
                and node.inputs[0] in graph.initializers:
            dims = graph.initializers[node.inputs[0]]
            if len(dims) == 2 and dims[0] != m.context_length:
                raise GraphMismatchError(f"the graph's position table has {dims[0]} positions, the manifest "
                                         f"says context_length {m.context_length}")
            if len(dims) == 2 and dims[1] != m.hidden_size:
                raise GraphMismatchError(f"the graph's position table has {dims[1]} channels, the manifest "
                                         f"says hidden_size {m.hidden_size}")
    _check_quantization(graph, manifest)
    if g.attention != "gqa":
        return
    # GroupQueryAttention carries the heads and, per layer, the local window (-1: global); so does
    # neoedge.kernels::Attention, which takes its place in the kernel graph (the past at input 1).
    by_past = {}
    for node in graph.nodes:
        if node.op_type == "GroupQueryAttention" and len(node.inputs) > 3:
            by_past[node.inputs[3]] = node
        elif node.op_type == "Attention" and node.domain == KERNEL_DOMAIN and len(node.inputs) > 1:
            by_past[node.inputs[1]] = node
    for layer, kind in enumerate(m.attention_layers):
        (past, _), _ = g.cache_pairs(layer)
        node = by_past.get(past)
        if node is None:
            raise GraphMismatchError(f"the graph has no attention for layer {layer} (no GroupQueryAttention "
                                     f"reads {past})")
        for attribute in ("num_heads", "kv_num_heads"):
            if node.ints.get(attribute, m.num_heads) != m.num_heads:
                raise GraphMismatchError(f"layer {layer}'s attention has {attribute} {node.ints[attribute]}, "
                                         f"the manifest says num_heads {m.num_heads}")
        window = node.ints.get("local_window_size", -1)
        expected = m.window_size if kind == "local" else -1
        if window != expected:
            found = "global attention" if window == -1 else f"a local window of {window}"
            wanted = "global attention" if kind == "global" else f"a local window of {m.window_size}"
            raise GraphMismatchError(f"layer {layer} of the graph has {found}, the manifest says {wanted} "
                                     "(model.attention_layers / model.window_size)")
    if len(by_past) != m.num_layers:
        raise GraphMismatchError(f"the graph has {len(by_past)} attention layers, the manifest says "
                                 f"num_layers {m.num_layers}")


def check_tokenizer(tokenizer: Tokenizer, manifest: Manifest) -> None:
    """The tokenizer must fit the model: no id at or beyond the vocabulary. (bos/eos need not be the
    tokenizer's special tokens: a checkpoint may end its texts with an ordinary token, and
    generation stops at the eos id whatever it decodes to.)"""
    m = manifest.model
    name = manifest.tokenizer
    count = tokenizer.vocab_size
    if count > m.vocab_size or tokenizer.id_to_token(m.vocab_size) is not None:
        raise TokenizerMismatchError(
            f"{name} has {count} tokens but the model's vocabulary is {m.vocab_size}: its ids would index "
            "past the embedding (the tokenizer of another model?)")
    missing = tokenizer.missing_bytes()
    if missing:
        raise TokenizerMismatchError(
            f"{name} is a byte-level BPE without tokens for {len(missing)} of the 256 bytes (e.g. "
            f"0x{missing[0]:02x}): text holding them would be silently dropped when encoded")
    # A quantized embedding (GatherBlockQuantized) does not check its indices: an id past the table
    # would read out of bounds and generate from garbage, so every id is bounded here.
    largest = tokenizer.max_id
    if largest >= m.vocab_size:
        raise TokenizerMismatchError(
            f"{name} has token id {largest} but the model's vocabulary is {m.vocab_size}: its ids would index "
            "past the embedding (a damaged or foreign tokenizer?)")
