"""How each weight MatMul, the embedding and the tied lm_head are stored and computed.

The graph builder asks a LinearQuantizer for every weight-bearing op, so a precision is one class
here rather than a rewrite of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from onnx import helper

if TYPE_CHECKING:
    from .graph import _Graph


class LinearQuantizer:
    """fp32: plain MatMul/Gather, the tied embedding stored once."""

    scheme = "none"

    def settings(self) -> dict[str, Any]:
        return {}

    # Biases are not the quantizer's business: the graph fuses them into SkipLayerNorm and FastGelu.
    def linear(self, g: _Graph, name: str, x: str, weight: np.ndarray) -> str:
        """x @ weight.T; weight is in torch's [out, in] layout."""
        w = g.initializer(f"{name}.weight", np.ascontiguousarray(weight.T))
        return g.op("MatMul", [x, w], f"{name}/MatMul")

    # embedding() is called before lm_head(): it stores the tied table that lm_head() reuses.
    def embedding(self, g: _Graph, name: str, table: np.ndarray, ids: str) -> str:
        self._table = g.initializer("transformer.wte.weight", table)
        self._table_shape = table.shape
        return g.op("Gather", [self._table, ids], f"{name}/Gather")

    def lm_head(self, g: _Graph, name: str, hidden: str, output: str, weight: np.ndarray | None = None) -> None:
        """logits = hidden @ table.T: the tied embedding table, or an untied lm_head `weight` [vocab, hidden]."""
        # Gemm with transB reads the [vocab, hidden] embedding as-is: no transposed second copy on
        # disk, and none in memory either (a Transpose of an initializer would be constant-folded
        # into one at session load).
        table = self._table if weight is None else g.initializer("lm_head.weight", weight)
        vocab, width = self._table_shape
        shape = g.op("Shape", [hidden], f"{name}/Shape")
        leading = g.op("Slice", [shape, g.constant([0]), g.constant([2])], f"{name}/Slice")
        out_shape = g.op("Concat", [leading, g.constant([vocab])], f"{name}/Concat", axis=0)
        flat = g.op("Reshape", [hidden, g.constant([-1, width])], f"{name}/flatten/Reshape")
        logits = g.op("Gemm", [flat, table], f"{name}/Gemm", transB=1)
        g.nodes.append(helper.make_node("Reshape", [logits, out_shape], [output], name=f"{name}/Reshape"))


class _Quantized(NamedTuple):
    """One quantized weight: MatMulNBits' initializer inputs and the attributes that go with them."""

    inputs: tuple[str, ...]  # packed weights, scales (, zero points)
    shape: tuple[int, int]  # torch's [out, in]
    bits: int
    block: int
    scales: np.ndarray  # [out, blocks]
    zero_points: np.ndarray | None  # as MatMulNBits stores them (4-bit: two per byte)


class NBitsQuantizer(LinearQuantizer):
    """Block-wise weight-only quantization for onnxruntime's MatMulNBits (4 or 8 bits).

    Each block of `block_size` consecutive input weights of an output row gets its own scale, and
    with `symmetric=False` its own zero point (min/max grid); symmetric blocks use MatMulNBits'
    implicit mid-range zero point (no per-block zero-point correction in the kernel). With
    accuracy_level 4 the activations are quantized to int8 on the fly, so the products run as int8
    dot products (VNNI on x86, SDOT on arm64).

    The tied embedding is stored once, in MatMulNBits' [vocab, blocks, block bytes] layout, which is
    the embedding table's own row order: the lm_head is a MatMulNBits on it, and the token lookup
    reads the packed rows of the requested tokens and dequantizes only those.
    """

    def __init__(self, bits: int, block_size: int, *, lm_head_bits: int | None = None,
                 symmetric: bool = False, fit_block: bool = False, accuracy_level: int = 4) -> None:
        for b in (bits, lm_head_bits or bits):
            if b not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {b}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.bits = bits
        self.block_size = block_size
        self.lm_head_bits = lm_head_bits or bits
        self.symmetric = symmetric
        # A default block size shrinks (halving) to fit a weight whose width it does not divide;
        # a block size the user asked for is used as given or refused.
        self.fit_block = fit_block
        self._blocks_used: set[int] = set()
        self._untied = False  # set by lm_head() when given a weight of its own
        self.accuracy_level = accuracy_level
        self.scheme = f"int{bits}"

    def _block_for(self, in_features: int) -> int:
        block = self.block_size
        while self.fit_block and in_features % block and block > 16:
            block //= 2
        self._blocks_used.add(block)
        return block

    def settings(self) -> dict[str, Any]:
        used = sorted(self._blocks_used) or [self.block_size]
        return {"method": "MatMulNBits", "bits": self.bits,
                "block_size": used[0] if len(used) == 1 else used,
                "lm_head_bits": self.lm_head_bits, "accuracy_level": self.accuracy_level,
                "zero_point": "symmetric" if self.symmetric else "asymmetric",
                "embedding": "untied: lm_head stored separately" if self._untied
                else "tied, shared with lm_head"}

    def _weight(self, g: _Graph, prefix: str, weight: np.ndarray, bits: int) -> _Quantized:
        block = self._block_for(weight.shape[1])
        packed, scales, zero_points = quantize_blockwise(weight, bits, block, symmetric=self.symmetric)
        names = [g.initializer(f"{prefix}.qweight", packed), g.initializer(f"{prefix}.scales", scales)]
        if zero_points is not None:
            names.append(g.initializer(f"{prefix}.qzeros", zero_points))
        return _Quantized(tuple(names), weight.shape, bits, block, scales, zero_points)

    def _matmul(self, g: _Graph, name: str, x: str, weight: _Quantized, output: str | None = None) -> str:
        out_features, in_features = weight.shape
        output = output or f"{name}/MatMulNBits/output_0"
        g.nodes.append(helper.make_node(
            "MatMulNBits", [x, *weight.inputs], [output], name=f"{name}/MatMulNBits", domain="com.microsoft",
            K=in_features, N=out_features, bits=weight.bits, block_size=weight.block,
            accuracy_level=self.accuracy_level))
        return output

    def linear(self, g: _Graph, name: str, x: str, weight: np.ndarray) -> str:
        return self._matmul(g, name, x, self._weight(g, name, weight, self.bits))

    def embedding(self, g: _Graph, name: str, table: np.ndarray, ids: str) -> str:
        self._tied = tied = self._weight(g, "transformer.wte", table, self.lm_head_bits)
        if self.symmetric or tied.bits == 8:
            return self._gather_block_quantized(g, name, tied, ids)
        return self._gather_and_dequantize(g, name, tied, ids)

    def _gather_block_quantized(self, g: _Graph, name: str, tied: _Quantized, ids: str) -> str:
        """One GatherBlockQuantized node reads the rows straight from MatMulNBits' packed table.

        It wants scales (and zero points) of the table's rank, [vocab, blocks, 1]: those small
        arrays are stored a second time in that shape, the packed table is not. Exact: it applies
        MatMulNBits' dequantization, implicit mid-range zero point included. A decode step runs one
        node here instead of a dozen, and on this CPU each node costs tens of µs once the weight
        streaming has evicted the caches."""
        vocab, width = tied.shape
        blocks = width // tied.block
        inputs = [tied.inputs[0], ids,
                  g.initializer("transformer.wte.row_scales", tied.scales.reshape(vocab, blocks, 1))]
        if tied.zero_points is not None:  # 8 bits: one zero point per byte already
            inputs.append(g.initializer("transformer.wte.row_zeros",
                                        tied.zero_points.reshape(vocab, blocks, 1)))
        rows = g.op("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain="com.microsoft",
                    gather_axis=0, quantize_axis=2, block_size=tied.block, bits=tied.bits)
        return g.op("Reshape", [rows, g.constant([0, 0, width])], f"{name}/Reshape")  # [batch, seq, width]

    def _gather_and_dequantize(self, g: _Graph, name: str, tied: _Quantized, ids: str) -> str:
        """Standard ops for the one case GatherBlockQuantized cannot read: 4 bits with zero points
        (MatMulNBits packs those two per byte). Gather the packed rows, unpack, subtract, scale."""
        width = tied.shape[1]
        blocks = width // tied.block
        packed, scales, packed_zeros = tied.inputs
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

    def lm_head(self, g: _Graph, name: str, hidden: str, output: str, weight: np.ndarray | None = None) -> None:
        if weight is not None:  # untied: its own table, at the lm_head's precision
            self._untied = True
            self._matmul(g, name, hidden, self._weight(g, "lm_head", weight, self.lm_head_bits), output)
            return
        self._matmul(g, name, hidden, self._tied, output)


def zeros_padded(blocks: int) -> bool:
    return blocks % 2 == 1


def _unpack_nibbles(g: _Graph, name: str, packed: str) -> str:
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


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _grid(blocks: np.ndarray, low: np.ndarray, high: np.ndarray, qmax: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales = (high - low) / qmax
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-low / scales), 0, qmax).astype(np.uint8)
    q = np.clip(np.round(blocks / scales[..., None]) + zero_points[..., None], 0, qmax).astype(np.uint8)
    return scales.astype(np.float32), zero_points, q


def _symmetric_grid(blocks: np.ndarray, extreme: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # MatMulNBits without zero points reads q as q - mid (mid = 8 for 4 bits). The integer grid
    # [-mid, mid - 1] is lopsided, so the scale's sign is chosen to put the block's largest-magnitude
    # weight on -mid, the longer side: a negative scale is fine for the kernel.
    mid = (qmax + 1) // 2
    scales = extreme / -mid
    scales[scales == 0] = 1.0
    zero_points = np.full(scales.shape, mid, np.uint8)
    q = np.clip(np.round(blocks / scales[..., None]) + mid, 0, qmax).astype(np.uint8)
    return scales.astype(np.float32), zero_points, q


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int, *, symmetric: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Min/max quantization of [out, in] weights in blocks along `in`.

    Returns MatMulNBits' inputs: packed weights uint8 [out, blocks, block_size * bits / 8],
    scales float32 [out, blocks], zero points uint8 [out, blocks] (8 bits) or
    [out, ceil(blocks / 2)] (4 bits, two per byte); no zero points when `symmetric`.
    """
    out_features, in_features = weight.shape
    if in_features % block_size:
        raise ValueError(f"cannot quantize a weight with {in_features} inputs in blocks of {block_size}: "
                         f"choose a block size that divides it")
    blocks = weight.astype(np.float32).reshape(out_features, in_features // block_size, block_size)
    qmax = (1 << bits) - 1
    # The range always includes 0 so that zero weights stay exactly zero.
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    extreme = np.where(-low > high, low, high)
    # Min/max ranges let one outlier stretch a whole block's grid. For each block, shrink the range
    # by the factor (from CLIP_RATIOS) that minimises its squared error; 1.0 keeps plain min/max.
    best_error = np.full(low.shape, np.inf, np.float32)
    scales = np.ones(low.shape, np.float32)
    zero_points = np.zeros(low.shape, np.uint8)
    q = np.zeros(blocks.shape, np.uint8)
    for ratio in CLIP_RATIOS if bits == 4 else (1.0,):
        s_, z_, q_ = _symmetric_grid(blocks, extreme * ratio, qmax) if symmetric \
            else _grid(blocks, low * ratio, high * ratio, qmax)
        error = np.square((q_.astype(np.float32) - z_[..., None]) * s_[..., None] - blocks).sum(axis=-1)
        better = error < best_error
        best_error[better] = error[better]
        scales[better], zero_points[better], q[better] = s_[better], z_[better], q_[better]
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    if symmetric:
        return np.ascontiguousarray(q), scales.astype(np.float32), None
    if bits == 4:
        if zeros_padded(zero_points.shape[1]):
            zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
        zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32), np.ascontiguousarray(zero_points)


SCHEMES = ("none", "int8", "int4")
# Chosen by measurement (benchmarks/quality.py on the trained model, benchmarks/suite.py for speed):
# int4 at block 128 without zero points decoded 1.2-1.6x faster than block 32 with them, at +1.1%
# perplexity on the trained model (the quantization target is +2%); `--block-size 32 --asymmetric`
# is the closest to the model and `--lm-head-bits 8` the cheapest large quality gain.
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 128}
DEFAULT_SYMMETRIC = {"int8": False, "int4": True}


def make_quantizer(scheme: str, *, block_size: int | None = None, lm_head_bits: int | None = None,
                   symmetric: bool | None = None) -> LinearQuantizer:
    from neoedge.errors import ExportError

    if scheme == "none":
        return LinearQuantizer()
    if scheme in ("int8", "int4"):
        return NBitsQuantizer(int(scheme[3:]), block_size or DEFAULT_BLOCK_SIZE[scheme],
                              lm_head_bits=lm_head_bits, fit_block=block_size is None,
                              symmetric=DEFAULT_SYMMETRIC[scheme] if symmetric is None else symmetric)
    raise ExportError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
