"""The kernel graph: the package's stock graph with its MatMulNBits and attention nodes run by
neoedge's kernels.

A package keeps its stock `model.onnx`, which any onnxruntime can run, and gets a second small graph
file beside it that is identical except that each MatMulNBits node the kernels implement is
`neoedge.kernels::MatMulNBits` (same inputs, attributes and semantics), each GroupQueryAttention
over an int8 per-channel cache is `neoedge.kernels::Attention` (the same semantics, with only the
inputs neoedge's graphs give it: qkv, the caches, the lengths and the cache scales), and each
SkipLayerNormalization and FastGelu is neoedge.kernels' op of that name, and the tied embedding's
GatherBlockQuantized over the lm_head's table is too. Both graphs read the same external weights
file, so the package grows by one graph (tens of KB), not by a second copy of the weights. Each
kernel MatMulNBits whose B and scales only kernels read is marked `rearrange_weights = 1`: its kernel
may then rearrange them in place into the layout its AVX-512 VNNI path reads (tiled.h); the
kernels' gather reads the table in either layout. The runtime loads the kernel graph when the kernels are available (neoedge.kernels) and the
stock one otherwise.

Export-time only (needs onnx).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper

STOCK_DOMAIN = "com.microsoft"
KERNEL_DOMAIN = "neoedge.kernels"  # neoedge.kernels.DOMAIN; not imported to keep export light
KERNEL_OPSET = 1


@dataclass(frozen=True)
class KernelGraphReport:
    """What write_kernel_graph did: how many nodes the kernels took, and why others stayed stock."""

    path: Path
    converted: int  # MatMulNBits nodes
    kept: dict[str, int] = field(default_factory=dict)  # reason -> node count
    attention: int = 0  # GroupQueryAttention nodes
    elementwise: int = 0  # SkipLayerNormalization and FastGelu nodes
    gathers: int = 0  # GatherBlockQuantized nodes over a kernel MatMulNBits' table

    def describe(self) -> str:
        kept = ", ".join(f"{count} {reason}" for reason, count in self.kept.items())
        return f"{self.path.name}: {self.converted} MatMulNBits, {self.attention} attention, " \
               f"{self.elementwise} SkipLayerNormalization/FastGelu and {self.gathers} GatherBlockQuantized " \
               f"node(s) on neoedge kernels" + \
               (f"; kept stock: {kept}" if kept else "")


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _why_not(node: onnx.NodeProto, element_types: dict[str, int]) -> str | None:
    """None if the kernels implement this node exactly, else the reason it stays stock."""
    attrs = _attributes(node)
    bits, block, k = attrs.get("bits", 4), attrs.get("block_size"), attrs.get("K")
    if attrs.get("accuracy_level", 0) != 4:
        return "not accuracy_level 4"
    if bits not in (4, 8):
        return f"{bits}-bit"
    if not isinstance(block, int) or not 16 <= block <= 256 or block & (block - 1) or not isinstance(k, int) or k % block:
        return "unsupported block size"
    if any(node.input[4:]):
        return "g_idx/bias inputs"
    if element_types.get(node.input[0], TensorProto.FLOAT) != TensorProto.FLOAT:
        return "non-fp32 activations"
    if len(node.input) > 3 and node.input[3] and element_types.get(node.input[3]) != TensorProto.UINT8:
        return "non-uint8 zero points"
    return None


# GroupQueryAttention's inputs the kernel op takes, in its order: qkv, past key and value, seqlens_k,
# total_sequence_length, k_scale, v_scale (1-2 are the separate key/value, 7-11 rotary caches,
# position ids, attention bias and head sink: absent in neoedge's graphs).
ATTENTION_INPUTS = (0, 3, 4, 5, 6, 12, 13)


# Attributes that leave the computation as the kernel op's when absent or at these values (an
# onnxruntime-optimized graph spells out defaults: smooth_softmax -1, causal 1, ...); any other
# attribute, or value, keeps the node stock.
_ATTENTION_NEUTRAL = {"causal": (1,), "smooth_softmax": (0, -1), "qk_output": (0,), "sliding_window_cache": (0,),
                      "softcap": (0.0,), "do_rotary": (0,)}
_ATTENTION_FREE = {"num_heads", "kv_num_heads", "scale", "local_window_size", "kv_cache_bit_width", "k_quant_type",
                   "v_quant_type", "rotary_interleaved", "qk_norm_epsilon"}  # the last two unused without inputs


def _attention_why_not(node: onnx.NodeProto, element_types: dict[str, int]) -> str | None:
    """None if neoedge.kernels::Attention computes this GroupQueryAttention exactly, else why not."""
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in _attributes(node).items()}
    if attrs.get("kv_cache_bit_width") != 8 or attrs.get("k_quant_type") != "PER_CHANNEL" \
            or attrs.get("v_quant_type") != "PER_CHANNEL":
        return "attention without an int8 per-channel cache"
    if attrs.get("num_heads") != attrs.get("kv_num_heads") or attrs.get("scale", 0.0) != 1.0:
        return "attention with grouped heads or scaled scores"
    for name, value in attrs.items():
        if name not in _ATTENTION_FREE and value not in _ATTENTION_NEUTRAL.get(name, ()):
            return f"attention with {name}={value}"
    inputs = list(node.input) + [""] * (14 - len(node.input))
    if any(inputs[i] for i in (1, 2, 7, 8, 9, 10, 11)) or not all(inputs[i] for i in ATTENTION_INPUTS) \
            or len(node.input) > 14 or element_types.get(inputs[3]) != TensorProto.INT8 \
            or len([o for o in node.output if o]) != 3:
        return "attention with other inputs"
    return None


def _elementwise_why_not(node: onnx.NodeProto, element_types: dict[str, int]) -> str | None:
    """None if neoedge.kernels' op of the same name computes this node, else why not. The kernels'
    SkipLayerNormalization has no mean / inverse deviation outputs (1 and 2)."""
    if any(element_types.get(name, TensorProto.FLOAT) != TensorProto.FLOAT for name in node.input if name):
        return f"{node.op_type} on other than float"
    attrs = set(_attributes(node))
    if node.op_type == "SkipLayerNormalization":
        if attrs - {"epsilon"} or len(node.input) > 5 or len(node.output) > 4 or any(node.output[1:3]):
            return "SkipLayerNormalization with other attributes or outputs"
    elif attrs or len(node.input) > 2 or len(node.output) != 1:
        return "FastGelu with other attributes or inputs"
    return None


def _convert_table_gathers(graph: onnx.GraphProto, element_types: dict[str, int]) -> int:
    """GatherBlockQuantized nodes reading a kernel MatMulNBits' B (the tied embedding) become
    neoedge.kernels' op of that name, which reads B in either layout (tiled or not). Returns how many."""
    kernel_tables = {n.input[1] for n in graph.node if n.domain == KERNEL_DOMAIN and n.op_type == "MatMulNBits"}
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    count = 0
    for node in graph.node:
        if node.domain != STOCK_DOMAIN or node.op_type != "GatherBlockQuantized" or node.input[0] not in kernel_tables:
            continue
        attrs = _attributes(node)
        bits = attrs.get("bits", 4)
        if attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) != 2 or bits not in (4, 8) \
                or len(shapes.get(node.input[0], [])) != 3 or element_types.get(node.input[1]) != TensorProto.INT64 \
                or (bits == 4 and len(node.input) > 3 and node.input[3]) or len(node.input) > 4:
            continue
        node.domain = KERNEL_DOMAIN
        count += 1
    return count


def _allow_rearranged_weights(graph: onnx.GraphProto) -> None:
    """Marks each kernel MatMulNBits whose B and scales only neoedge kernels that read the tiled
    layout read (rearrange_weights = 1): its kernel may then rearrange them in place for the AVX-512
    VNNI path (the kernels' tiled layout), which any other reader would misread. Those readers:
    symmetric kernel MatMulNBits nodes reading it in the same place, and the kernels' table gather
    reading B (not its scales). A graph with subgraphs is left unmarked: their nodes may read the
    outer graph's initializers."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    outputs = {o.name for o in graph.output}

    def tiling(node: onnx.NodeProto) -> bool:
        return node.domain == KERNEL_DOMAIN and node.op_type == "MatMulNBits" and not any(node.input[3:])

    def tiled_reader(reader: onnx.NodeProto, index: int, slot: int) -> bool:
        if tiling(reader):
            return index == slot
        return reader.domain == KERNEL_DOMAIN and reader.op_type == "GatherBlockQuantized" and index == 0 and slot == 1

    for node in graph.node:
        if not tiling(node):
            continue
        if all(name not in outputs and all(tiled_reader(r, i, slot) for r, i in readers[name])
               for slot, name in ((1, node.input[1]), (2, node.input[2]))):
            node.attribute.append(helper.make_attribute("rearrange_weights", 1))


def sort_opsets(model: onnx.ModelProto) -> None:
    """Only the opsets the graph's nodes use, in domain order. onnxruntime writes an optimized model
    with an import for every domain registered in the process (a custom-op library loaded by an
    earlier validation adds its own, at a version of its choosing) in the order of a hash map: the
    package must be the same bytes whatever ran before."""
    used = {node.domain for node in model.graph.node} | {""}
    opsets = sorted((o for o in model.opset_import if o.domain in used), key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def write_kernel_graph(stock_graph_path: str | Path, out_path: str | Path) -> KernelGraphReport:
    """Writes the kernel graph of `stock_graph_path` to `out_path` (same directory: the external
    weights are referenced relative to the graph, and onnxruntime reads them only from beside it)."""
    stock, out = Path(stock_graph_path), Path(out_path)
    if stock.resolve().parent != out.resolve().parent:
        raise ValueError(f"the kernel graph must be written beside {stock.name} (in {stock.parent}), "
                         f"so that both read the same external weights; got {out}")
    if stock.resolve() == out.resolve():
        raise ValueError(f"the kernel graph would overwrite the stock graph {stock}")
    model = onnx.load(str(stock), load_external_data=False)
    graph = model.graph
    element_types = {t.name: t.data_type for t in graph.initializer}
    element_types.update({v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info)})
    converted, attention, elementwise, kept = 0, 0, 0, Counter()
    for node in graph.node:
        if node.domain != STOCK_DOMAIN:
            continue
        if node.op_type in ("SkipLayerNormalization", "FastGelu"):
            reason = _elementwise_why_not(node, element_types)
            if reason:
                kept[reason] += 1
            else:
                node.domain = KERNEL_DOMAIN
                elementwise += 1
            continue
        if node.op_type == "GroupQueryAttention":
            reason = _attention_why_not(node, element_types)
            if reason:
                kept[reason] += 1
                continue
            inputs = [node.input[i] for i in ATTENTION_INPUTS]
            attrs = _attributes(node)
            del node.input[:]
            node.input.extend(inputs)
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("num_heads", attrs["num_heads"]),
                                   helper.make_attribute("local_window_size", attrs.get("local_window_size", -1))])
            node.op_type, node.domain = "Attention", KERNEL_DOMAIN
            attention += 1
            continue
        if node.op_type != "MatMulNBits":
            continue
        reason = _why_not(node, element_types)
        if reason:
            kept[reason] += 1
            continue
        node.domain = KERNEL_DOMAIN
        del node.input[4:]  # absent g_idx/bias: the kernel op declares four inputs
        converted += 1
    gathers = _convert_table_gathers(graph, element_types)
    _allow_rearranged_weights(graph)
    others = [o for o in model.opset_import if o.domain != KERNEL_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(others)
    if converted or attention or elementwise:
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, KERNEL_OPSET))
    sort_opsets(model)
    onnx.save(model, str(out))
    return KernelGraphReport(out, converted, dict(kept), attention, elementwise, gathers)
