"""Block-wise integer weights in onnxruntime's MatMulNBits layout: the grid, the packing, and
round-to-nearest quantization.

A weight [out, in] is cut into blocks of `block` consecutive inputs of each output row; every block
has its own scale and, unless symmetric, its own zero point. Dequantized, a code q of a block is
(q - zero_point) * scale. Symmetric blocks have no stored zero points: MatMulNBits then reads every
code with the implicit mid-range zero point (8 for 4 bits, 128 for 8), and the kernel skips the
per-block zero-point correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """One weight in MatMulNBits' layout (its initializer inputs), for a [out, in] torch weight."""

    packed: np.ndarray  # uint8 [out, blocks, block * bits / 8]; 4 bits: two codes a byte, low nibble first
    scales: np.ndarray  # float32 [out, blocks]
    # uint8 as MatMulNBits stores them: [out, blocks] (8 bits) or [out, ceil(blocks / 2)] (4 bits,
    # two a byte); None when symmetric.
    zero_points: np.ndarray | None
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        """torch's [out, in]."""
        return self.scales.shape[0], self.scales.shape[1] * self.block

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def codes(self) -> np.ndarray:
        """uint8 [out, in], one code per weight."""
        if self.bits == 8:
            return self.packed.reshape(self.shape)
        pairs = np.stack([self.packed & 15, self.packed >> 4], axis=-1)
        return pairs.reshape(self.shape)

    def zero_point_values(self) -> np.ndarray:
        """uint8 [out, blocks]: every block's zero point, the implicit mid-range one if symmetric."""
        out, blocks = self.scales.shape
        if self.zero_points is None:
            return np.full((out, blocks), 1 << (self.bits - 1), np.uint8)
        if self.bits == 8:
            return self.zero_points
        pairs = np.stack([self.zero_points & 15, self.zero_points >> 4], axis=-1)
        return pairs.reshape(out, -1)[:, :blocks]

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]: the weights the kernel computes with (at accuracy_level 0)."""
        out, blocks = self.scales.shape
        codes = self.codes().reshape(out, blocks, self.block).astype(np.float32)
        values = (codes - self.zero_point_values()[..., None]) * self.scales[..., None]
        return values.reshape(self.shape)

    def with_row_scales(self, factors: np.ndarray) -> QuantizedTensor:
        """The same codes with every row's scales multiplied by factors[row] (> 0): exactly the
        dequantized weight with its rows scaled."""
        scales = (self.scales * np.asarray(factors, np.float32)[:, None]).astype(np.float32)
        return QuantizedTensor(self.packed, scales, self.zero_points, self.bits, self.block)

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Outputs start..stop-1 (rows are independent in this layout)."""
        zero_points = None if self.zero_points is None else self.zero_points[start:stop]
        return QuantizedTensor(self.packed[start:stop], self.scales[start:stop], zero_points, self.bits, self.block)

    @staticmethod
    def concat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Stack weights along their outputs (rows are independent in this layout)."""
        first = parts[0]
        if any((p.bits, p.block, p.symmetric, p.shape[1]) != (first.bits, first.block, first.symmetric, first.shape[1])
               for p in parts):
            raise ValueError("only weights quantized alike, with the same inputs, can be stacked")
        zero_points = None if first.symmetric else np.concatenate([p.zero_points for p in parts])
        return QuantizedTensor(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                               zero_points, first.bits, first.block)


@dataclass(frozen=True, eq=False)
class QuantizedTable(QuantizedTensor):
    """The tied embedding/lm_head table: one set of codes (stored once), the lm_head's `scales`,
    and the token lookup's own scales for the same codes. GatherBlockQuantized reads its scales from
    an initializer of its own anyway ([vocab, blocks, 1]), so the lookup can have the scales that
    bring its rows closest to the embedding while the lm_head keeps the ones fitted to its inputs."""

    lookup_scales: np.ndarray | None = None  # float32 [vocab, blocks]; None: the lm_head's


def zeros_padded(blocks: int) -> bool:
    """4-bit zero points are packed two a byte: an odd number of blocks pads the last byte."""
    return blocks % 2 == 1


def pack(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
         block: int) -> QuantizedTensor:
    """MatMulNBits' layout from codes uint8 [out, in], scales [out, blocks] and zero points uint8
    [out, blocks] (None: symmetric)."""
    out_features, in_features = codes.shape
    q = np.asarray(codes, np.uint8).reshape(out_features, in_features // block, block)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    if zero_points is not None and bits == 4:
        if zeros_padded(zero_points.shape[1]):
            zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
        zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    return QuantizedTensor(np.ascontiguousarray(q), np.asarray(scales, np.float32),
                           None if zero_points is None else np.ascontiguousarray(zero_points), bits, block)


# -- the grid ---------------------------------------------------------------------------------------

def minmax_grid(low: np.ndarray, high: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points that map [low, high] onto the codes 0..qmax."""
    scales = (high - low) / qmax
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-low / scales), 0, qmax).astype(np.uint8)
    return scales.astype(np.float32), zero_points


def symmetric_grid(extreme: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    # MatMulNBits without zero points reads q as q - mid (mid = 8 for 4 bits). The integer grid
    # [-mid, mid - 1] is lopsided, so the scale's sign is chosen to put the block's largest-magnitude
    # weight on -mid, the longer side: a negative scale is fine for the kernel.
    mid = (qmax + 1) // 2
    scales = extreme / -mid
    scales[scales == 0] = 1.0
    return scales.astype(np.float32), np.full(scales.shape, mid, np.uint8)


def quantize_codes(blocks: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest codes uint8 of `blocks` [..., block] on a grid (scales, zero points [...])."""
    return np.clip(np.round(blocks / scales[..., None]) + zero_points[..., None], 0, qmax).astype(np.uint8)


# Min/max ranges let one outlier stretch a whole block's grid; the 4-bit search shrinks each block's
# range by the factor that minimises its (weighted) squared error. 1.0 keeps plain min/max.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def clip_ratios(bits: int) -> tuple[float, ...]:
    """fit_grid's default clipping search: CLIP_RATIOS at 4 bits; 8 bits keeps min/max."""
    return CLIP_RATIOS if bits == 4 else (1.0,)


def fit_grid(blocks: np.ndarray, bits: int, *, symmetric: bool, importance: np.ndarray | None = None,
             ratios: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scales float32 and zero points uint8 [...] for `blocks` [..., block].

    The range always includes 0 so that zero weights stay exactly zero. Among the clipping `ratios`
    (default: CLIP_RATIOS at 4 bits, none at 8), each block takes the one that minimises
    sum(importance * (dequantized - weight)^2); `importance` [..., block] or broadcastable to it
    (None: every weight counts alike).
    """
    qmax = (1 << bits) - 1
    if ratios is None:
        ratios = clip_ratios(bits)
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    extreme = np.where(-low > high, low, high)
    best_error = np.full(low.shape, np.inf, np.float32)
    scales = np.ones(low.shape, np.float32)
    zero_points = np.zeros(low.shape, np.uint8)
    error = np.empty(blocks.shape, np.float32)
    for ratio in ratios:
        s_, z_ = symmetric_grid(extreme * ratio, qmax) if symmetric else minmax_grid(low * ratio, high * ratio, qmax)
        # (dequantized - weight)^2 in one buffer: the codes as floats, as quantize_codes rounds them.
        np.divide(blocks, s_[..., None], out=error)
        np.round(error, out=error)
        # Clipping code - zero point to [-z, qmax - z] is clipping the code to [0, qmax]: small
        # integers, exact in float32, in one pass instead of three.
        low_code = -z_[..., None].astype(np.float32)
        np.clip(error, low_code, low_code + qmax, out=error)
        error *= s_[..., None]
        error -= blocks
        np.square(error, out=error)
        if importance is not None:
            error *= importance
        error_sum = error.sum(axis=-1)
        better = error_sum < best_error
        best_error[better] = error_sum[better]
        scales[better], zero_points[better] = s_[better], z_[better]
    return scales, zero_points


def check_block(in_features: int, block: int) -> None:
    if in_features % block:
        raise ValueError(f"cannot quantize a weight with {in_features} inputs in blocks of {block}: "
                         f"choose a block size that divides it")


def quantize_blockwise(weight: np.ndarray, bits: int, block: int, *, symmetric: bool = False,
                       importance: np.ndarray | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of [out, in] weights in blocks along `in`, with the grid of
    fit_grid. `importance` [in] (e.g. the mean squared activation of each input) weights the
    clipping search's error; None weighs every input alike."""
    out_features, in_features = weight.shape
    check_block(in_features, block)
    blocks = weight.astype(np.float32).reshape(out_features, in_features // block, block)
    if importance is not None:
        importance = np.asarray(importance, np.float32).reshape(in_features // block, block)
    scales, zero_points = fit_grid(blocks, bits, symmetric=symmetric, importance=importance)
    codes = quantize_codes(blocks, scales, zero_points, (1 << bits) - 1)
    return pack(codes.reshape(out_features, in_features), scales, None if symmetric else zero_points, bits, block)


def refit_scales(quantized: QuantizedTensor, weight: np.ndarray, hessian: np.ndarray | None = None) -> np.ndarray:
    """The scales float32 [out, blocks] that, with `quantized`'s codes and zero points kept, bring
    the dequantized weight closest to `weight` [out, in]: in the plain squared error (per block), or
    with `hessian` [in, in] in (w - w')^T H (w - w') over each whole row (the layer's output error
    on inputs of that second moment; blocks of a row interact through H). Least squares, solved
    exactly; a block whose codes are all at the zero point keeps its scale."""
    out_features, blocks = quantized.scales.shape
    block = quantized.block
    if hessian is None:
        centered = (quantized.codes().reshape(out_features, blocks, block).astype(np.float64)
                    - quantized.zero_point_values()[..., None])  # c' [out, blocks, block]
        w = np.asarray(weight, np.float64).reshape(out_features, blocks, block)
        gram = np.einsum("obk,obk->ob", centered, centered)
        target = np.einsum("obk,obk->ob", centered, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            scales = np.where(gram > 0, target / gram, quantized.scales)
        return scales.astype(np.float32)
    return _refit_scales_hessian(quantized, weight, hessian)


def _refit_scales_hessian(quantized: QuantizedTensor, weight: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """refit_scales with a hessian. float32 products (the centered codes are small integers, exact
    in float32) in torch, on torch's one thread pool and buffers (numpy's BLAS pool contends with
    it on a 2-core machine, and numpy's float64 einsums were most of this function's time), summed
    in float64 for the float64 normal equations."""
    import torch

    out_features, blocks = quantized.scales.shape
    block = quantized.block
    h = torch.tensor(np.asarray(hessian, np.float32))
    codes = quantized.codes().reshape(out_features, blocks, block)
    zero_points = quantized.zero_point_values()[..., None].astype(np.float32)
    scales = quantized.scales.astype(np.float64)
    for first in range(0, out_features, 4096):  # rows are independent; a few thousand at a time
        rows = slice(first, min(first + 4096, out_features))
        count = rows.stop - rows.start
        c = torch.empty((count, blocks, block), dtype=torch.float32)  # c' [rows, blocks, block]
        np.subtract(codes[rows], zero_points[rows], out=c.numpy(), dtype=np.float32)
        target_w = torch.tensor(np.asarray(weight[rows], np.float32))  # [rows, in]
        gram = torch.empty((count, blocks, blocks), dtype=torch.float64)
        for b in range(blocks):
            # c'_b^T H_b. (H restricted to block b's rows) from block b on, for every row at once:
            # [rows, in - b * block]. The gram is symmetric: its blocks before b are mirrored.
            t = c[:, b] @ h[b * block:(b + 1) * block, b * block:]
            gram[:, b, b:] = (t.view(count, blocks - b, block) * c[:, b:]).double().sum(-1)
            gram[:, b + 1:, b] = gram[:, b, b + 1:]
        # c'_b^T (H w)_b for every block at once.
        target = (c * (target_w @ h).view(count, blocks, block)).double().sum(-1)
        gram_, target_ = gram.numpy(), target.numpy()
        # Normal equations per row: sum_c (c'_b^T H_bc c'_c) s_c = c'_b^T H w.
        solvable = np.linalg.det(gram_) > 1e-30 * np.prod(np.einsum("rbb->rb", gram_), axis=-1)
        solved = scales[rows].copy()
        if solvable.any():
            solved[solvable] = np.linalg.solve(gram_[solvable], target_[solvable][..., None])[..., 0]
        scales[rows] = solved
    return scales.astype(np.float32)
