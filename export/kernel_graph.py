"""The kernel graph: the package's stock graph with its MatMulNBits nodes run by neoedge's kernels.

A package keeps its stock `model.onnx`, which any onnxruntime can run, and gets a second small graph
file beside it that is identical except that each MatMulNBits node the kernels implement is
`neoedge.kernels::MatMulNBits` (same inputs, attributes and semantics). Both graphs read the same
external weights file, so the package grows by one graph (tens of KB), not by a second copy of the
weights. The runtime loads the kernel graph when the kernels are available (neoedge.kernels) and the
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
    converted: int
    kept: dict[str, int] = field(default_factory=dict)  # reason -> node count

    def describe(self) -> str:
        kept = ", ".join(f"{count} {reason}" for reason, count in self.kept.items())
        return f"{self.path.name}: {self.converted} MatMulNBits node(s) on neoedge kernels" + \
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
    converted, kept = 0, Counter()
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != STOCK_DOMAIN:
            continue
        reason = _why_not(node, element_types)
        if reason:
            kept[reason] += 1
            continue
        node.domain = KERNEL_DOMAIN
        del node.input[4:]  # absent g_idx/bias: the kernel op declares four inputs
        converted += 1
    others = [o for o in model.opset_import if o.domain != KERNEL_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(others)
    if converted:
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, KERNEL_OPSET))
    sort_opsets(model)
    onnx.save(model, str(out))
    return KernelGraphReport(out, converted, dict(kept))
