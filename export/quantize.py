"""How each weight MatMul, the token embedding and the tied lm_head are stored and computed in the
graph: fp32 weights as MatMul/Gather/Gemm, block-wise quantized ones as onnxruntime's MatMulNBits.

The graph builder hands every weight-bearing op to a WeightStorage, which looks only at how the
weight it is given is stored (an fp32 array or a QuantizedTensor); how the weights were quantized
is the quantization step's business (weight_quantization.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blockwise import QuantizedTable, QuantizedTensor, zeros_padded
from .graph_builder import GraphBuilder
from .weights import Tensor

MS_DOMAIN = "com.microsoft"
TABLE_NAME = "transformer.wte"


@dataclass(frozen=True)
class TiedTable:
    """The token embedding as stored in the graph, once: the token lookup and the lm_head both read it."""

    inputs: tuple[str, ...]  # fp32: the table; quantized: packed weights, scales (, zero points)
    shape: tuple[int, int]  # [vocab, hidden]
    quantized: QuantizedTensor | None

    @property
    def lookup_scales(self) -> np.ndarray | None:
        """The token lookup's own scales [vocab, blocks], if they differ from the lm_head's."""
        if isinstance(self.quantized, QuantizedTable):
            return self.quantized.lookup_scales
        return None


class WeightStorage:
    """Writes weight-bearing ops. `accuracy_level` is MatMulNBits': 4 quantizes the activations to
    int8 on the fly (int8 dot products: VNNI on x86, SDOT on arm64); 0 computes in fp32 on the
    dequantized weights (the tests' exact check of the packing)."""

    def __init__(self, accuracy_level: int = 4) -> None:
        self.accuracy_level = accuracy_level

    # Biases are not the storage's business: the graph fuses them into SkipLayerNorm and FastGelu.
    def linear(self, g: GraphBuilder, name: str, x: str, weight: Tensor) -> str:
        """x @ weight.T; an fp32 weight is in torch's [out, in] layout."""
        if isinstance(weight, QuantizedTensor):
            return self._matmul_nbits(g, name, x, self._initializers(g, name, weight), weight)
        w = g.initializer(f"{name}.weight", np.ascontiguousarray(weight.T))
        return g.op("MatMul", [x, w], f"{name}/MatMul")

    def tied_table(self, g: GraphBuilder, table: Tensor) -> TiedTable:
        """Store the token embedding [vocab, hidden]; the handle is what embedding() and lm_head() read."""
        if isinstance(table, QuantizedTensor):
            return TiedTable(self._initializers(g, TABLE_NAME, table), table.shape, table)
        return TiedTable((g.initializer(f"{TABLE_NAME}.weight", table),), table.shape, None)

    def embedding(self, g: GraphBuilder, name: str, table: TiedTable, ids: str) -> str:
        """The rows of `ids`: [batch, sequence, hidden]."""
        if table.quantized is None:
            return g.op("Gather", [table.inputs[0], ids], f"{name}/Gather")
        if table.quantized.symmetric or table.quantized.bits == 8:
            return self._gather_block_quantized(g, name, table, ids)
        return self._gather_and_dequantize(g, name, table, ids)

    def lm_head(self, g: GraphBuilder, name: str, table: TiedTable, hidden: str, output: str) -> None:
        """logits = hidden @ table.T, written to `output`."""
        if table.quantized is not None:
            self._matmul_nbits(g, name, hidden, table.inputs, table.quantized, output)
            return
        self._gemm_transposed(g, name, hidden, table.inputs[0], table.shape, output)

    def untied_lm_head(self, g: GraphBuilder, name: str, weight: Tensor, hidden: str, output: str) -> None:
        """logits = hidden @ weight.T for an lm_head of its own [vocab, hidden], written to `output`."""
        if isinstance(weight, QuantizedTensor):
            self._matmul_nbits(g, name, hidden, self._initializers(g, "lm_head", weight), weight, output)
            return
        self._gemm_transposed(g, name, hidden, g.initializer("lm_head.weight", weight), weight.shape, output)

    @staticmethod
    def _gemm_transposed(g: GraphBuilder, name: str, hidden: str, table: str, table_shape: tuple[int, ...],
                         output: str) -> None:
        # Gemm with transB reads the [vocab, hidden] embedding as-is: no transposed second copy on
        # disk, and none in memory either (a Transpose of an initializer would be constant-folded
        # into one at session load).
        vocab, width = table_shape
        shape = g.op("Shape", [hidden], f"{name}/Shape")
        leading = g.op("Slice", [shape, g.constant([0]), g.constant([2])], f"{name}/Slice")
        out_shape = g.op("Concat", [leading, g.constant([vocab])], f"{name}/Concat", axis=0)
        flat = g.op("Reshape", [hidden, g.constant([-1, width])], f"{name}/flatten/Reshape")
        logits = g.op("Gemm", [flat, table], f"{name}/Gemm", transB=1)
        g.node_to("Reshape", [logits, out_shape], [output], f"{name}/Reshape")

    # -- MatMulNBits ------------------------------------------------------------------------------
    @staticmethod
    def _initializers(g: GraphBuilder, prefix: str, weight: QuantizedTensor) -> tuple[str, ...]:
        names = [g.initializer(f"{prefix}.qweight", weight.packed), g.initializer(f"{prefix}.scales", weight.scales)]
        if weight.zero_points is not None:
            names.append(g.initializer(f"{prefix}.qzeros", weight.zero_points))
        return tuple(names)

    def _matmul_nbits(self, g: GraphBuilder, name: str, x: str, inputs: tuple[str, ...], weight: QuantizedTensor,
                      output: str | None = None) -> str:
        out_features, in_features = weight.shape
        output = output or f"{name}/MatMulNBits/output_0"
        g.node_to("MatMulNBits", [x, *inputs], [output], f"{name}/MatMulNBits", domain=MS_DOMAIN,
                  K=in_features, N=out_features, bits=weight.bits, block_size=weight.block,
                  accuracy_level=self.accuracy_level)
        return output

    @staticmethod
    def _gather_block_quantized(g: GraphBuilder, name: str, table: TiedTable, ids: str) -> str:
        """One GatherBlockQuantized node reads the rows straight from MatMulNBits' packed table.

        It wants scales (and zero points) of the table's rank, [vocab, blocks, 1]: those small
        arrays are stored a second time in that shape, the packed table is not. Exact: it applies
        MatMulNBits' dequantization, implicit mid-range zero point included. A decode step runs one
        node here instead of a dozen, and on this CPU each node costs tens of µs once the weight
        streaming has evicted the caches."""
        tied = table.quantized
        vocab, width = table.shape
        blocks = width // tied.block
        scales = tied.scales if table.lookup_scales is None else table.lookup_scales
        inputs = [table.inputs[0], ids, g.initializer(f"{TABLE_NAME}.row_scales", scales.reshape(vocab, blocks, 1))]
        if tied.zero_points is not None:  # 8 bits: one zero point per byte already
            inputs.append(g.initializer(f"{TABLE_NAME}.row_zeros", tied.zero_points.reshape(vocab, blocks, 1)))
        rows = g.op("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain=MS_DOMAIN,
                    gather_axis=0, quantize_axis=2, block_size=tied.block, bits=tied.bits)
        return g.op("Reshape", [rows, g.constant([0, 0, width])], f"{name}/Reshape")  # [batch, seq, width]

    @staticmethod
    def _gather_and_dequantize(g: GraphBuilder, name: str, table: TiedTable, ids: str) -> str:
        """Standard ops for the one case GatherBlockQuantized cannot read: 4 bits with zero points
        (MatMulNBits packs those two per byte). Gather the packed rows, unpack, subtract, scale."""
        width = table.shape[1]
        blocks = width // table.quantized.block
        packed, scales, packed_zeros = table.inputs
        if table.lookup_scales is not None:
            scales = g.initializer(f"{TABLE_NAME}.row_scales", table.lookup_scales)
        rows = g.op("Gather", [packed, ids], f"{name}/rows/Gather")  # [batch, seq, blocks, block bytes]
        values = g.op("Cast", [_unpack_nibbles(g, f"{name}/rows", rows)], f"{name}/rows/Cast", to=1)
        zeros = _unpack_nibbles(g, f"{name}/zeros", g.op("Gather", [packed_zeros, ids], f"{name}/zeros/Gather"))
        if zeros_padded(blocks):
            zeros = g.op("Slice", [zeros, g.constant([0]), g.constant([blocks]), g.constant([-1])],
                         f"{name}/zeros/trim/Slice")
        zeros = g.op("Cast", [zeros], f"{name}/zeros/Cast", to=1)
        zeros = g.op("Unsqueeze", [zeros, g.constant([-1])], f"{name}/zeros/Unsqueeze")
        row_scales = g.op("Gather", [scales, ids], f"{name}/scales/Gather")  # [batch, seq, blocks]
        row_scales = g.op("Unsqueeze", [row_scales, g.constant([-1])], f"{name}/scales/Unsqueeze")
        values = g.op("Sub", [values, zeros], f"{name}/Sub")
        values = g.op("Mul", [values, row_scales], f"{name}/Mul")
        return g.op("Reshape", [values, g.constant([0, 0, width])], f"{name}/Reshape")


def _unpack_nibbles(g: GraphBuilder, name: str, packed: str) -> str:
    """uint8 [..., n] -> uint8 [..., 2n]: low nibble first, as MatMulNBits packs them."""
    low = g.op("BitwiseAnd", [packed, g.constant(15, np.uint8)], f"{name}/low/BitwiseAnd")
    high = g.op("BitShift", [packed, g.constant(4, np.uint8)], f"{name}/high/BitShift", direction="RIGHT")
    low = g.op("Unsqueeze", [low, g.constant([-1])], f"{name}/low/Unsqueeze")
    high = g.op("Unsqueeze", [high, g.constant([-1])], f"{name}/high/Unsqueeze")
    pairs = g.op("Concat", [low, high], f"{name}/Concat", axis=-1)
    shape = g.op("Shape", [packed], f"{name}/Shape")
    leading = g.op("Slice", [shape, g.constant([0]), g.constant([-1])], f"{name}/Slice")
    shape = g.op("Concat", [leading, g.constant([-1])], f"{name}/shape/Concat", axis=0)
    return g.op("Reshape", [pairs, shape], f"{name}/Reshape")
