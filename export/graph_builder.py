"""Accumulates an ONNX graph's nodes and initializers; node names carry their place in the model.

The decoder graph (graph.py) and the weight storage (quantize.py) both write through a GraphBuilder;
neither reaches into the other's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights_file import ExternalWeights


class GraphBuilder:
    """Nodes and initializers in the order they are made. With a `weights_file`, initializers are
    written there as they are made and the graph keeps only their location."""

    def __init__(self, weights_file: ExternalWeights | None = None) -> None:
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}
        self._weights_file = weights_file

    def node(self, op: str, inputs: Sequence[str], name: str, *, outputs: int = 1,
             domain: str = "", **attrs: Any) -> list[str]:
        """Add a node whose outputs are named after it; returns those names."""
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.node_to(op, inputs, outs, name, domain=domain, **attrs)
        return outs

    def node_to(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, *,
                domain: str = "", **attrs: Any) -> None:
        """Add a node with the given output names (graph outputs, the KV cache's present tensors,
        optional outputs left empty)."""
        self._nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))

    def op(self, op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """Add a single-output node; returns its output's name."""
        return self.node(op, inputs, name, **attrs)[0]

    def initializer(self, name: str, array: np.ndarray) -> str:
        if self._weights_file is not None:
            self._initializers.append(self._weights_file.tensor(name, array))
        else:
            self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, made once per distinct value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.initializer(f"/const_{len(self._constants)}", array)
        return self._constants[key]

    def graph(self, name: str, inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self._nodes, name, list(inputs), list(outputs), self._initializers)
