"""How each weight MatMul, the embedding and the tied lm_head are stored and computed.

The graph builder asks a LinearQuantizer for every weight-bearing op, so a precision is one class
here rather than a rewrite of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import helper

if TYPE_CHECKING:
    from .graph import _Graph


class LinearQuantizer:
    """fp32: plain MatMul/Gather, the tied embedding stored once."""

    scheme = "none"

    def settings(self) -> dict[str, Any]:
        return {}

    def linear(self, g: _Graph, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        """x @ weight.T (+ bias); weight is in torch's [out, in] layout."""
        w = g.initializer(f"{name}.weight", np.ascontiguousarray(weight.T))
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.initializer(f"{name}.bias", bias)], f"{name}/Add")
        return y

    def embedding(self, g: _Graph, name: str, table: np.ndarray, ids: str) -> str:
        self._table = g.initializer("transformer.wte.weight", table)
        self._table_shape = table.shape
        return g.op("Gather", [self._table, ids], f"{name}/Gather")

    def lm_head(self, g: _Graph, name: str, hidden: str, output: str) -> None:
        # Gemm with transB reads the [vocab, hidden] embedding as-is: no transposed second copy on
        # disk, and none in memory either (a Transpose of an initializer would be constant-folded
        # into one at session load).
        vocab, width = self._table_shape
        shape = g.op("Shape", [hidden], f"{name}/Shape")
        leading = g.op("Slice", [shape, g.constant([0]), g.constant([2])], f"{name}/Slice")
        out_shape = g.op("Concat", [leading, g.constant([vocab])], f"{name}/Concat", axis=0)
        flat = g.op("Reshape", [hidden, g.constant([-1, width])], f"{name}/flatten/Reshape")
        logits = g.op("Gemm", [flat, self._table], f"{name}/Gemm", transB=1)
        g.nodes.append(helper.make_node("Reshape", [logits, out_shape], [output], name=f"{name}/Reshape"))


SCHEMES = ("none",)


def make_quantizer(scheme: str) -> LinearQuantizer:
    from neoedge.errors import ExportError

    if scheme == "none":
        return LinearQuantizer()
    raise ExportError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
