"""GPTQ (Frantar et al., 2022) for MatMulNBits' block-wise layout.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes a weight matrix one input column
at a time and spreads each column's rounding error over the columns not yet quantized, in the
proportions that minimise the error of the layer's output on the calibration inputs,
||X W^T - X Q^T||^2, through the inverse of H = X^T X (the "Hessian"). Each block's scale (and zero
point) is chosen when the quantization reaches the block's first column, from the weights as the
earlier columns' errors left them, so the result is exactly MatMulNBits' layout: the same blocks,
the same per-block scales, codes anywhere in the grid.

With `act_order`, columns go in order of decreasing H diagonal (the inputs with the most energy
first, while the most columns are left to absorb their errors); the block scales are then fixed
up front from the original weights ("static groups"), which keeps the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import gptq_native
from .blockwise import QuantizedTensor, check_block, clip_ratios, fit_grid, pack


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, block: int, *, symmetric: bool,
                  damping: float = 0.01, act_order: bool = False, weighted_clip: bool = True,
                  native: bool = True) -> QuantizedTensor:
    """Quantize `weight` [out, in] for inputs whose second moment is `hessian` ([in, in], the mean
    of x x^T over the calibration tokens).

    `damping` (a fraction of the mean diagonal, added to it) keeps H invertible and limits how far
    the calibration inputs can pull the weights. `weighted_clip` chooses each block's clipping by
    its error weighted by H's diagonal (the inputs' energy) instead of the plain squared error.
    `native` runs the column loop in neoedge's kernel library where it can (not with act_order);
    False, or no library, runs it in numpy.
    """
    out_features, in_features = weight.shape
    check_block(in_features, block)
    if block % SUB_BATCH and SUB_BATCH % block:
        # The numpy loop fits a block's grid at its first column, which must then have every
        # earlier error: the sub-batch and the block must nest (schemes use powers of two >= 16).
        raise ValueError(f"GPTQ needs a block size that divides or is divided by {SUB_BATCH}, got {block}")
    h = np.array(hessian, dtype=np.float64)
    diagonal = np.diagonal(h).copy()
    # An input that never fired during calibration has no error to spread: treat it as independent.
    dead = diagonal <= 0
    mean_diagonal = float(diagonal[~dead].mean()) if (~dead).any() else 1.0
    h[dead, dead] = mean_diagonal
    h[np.diag_indices(in_features)] += damping * mean_diagonal
    importance = np.diagonal(h).astype(np.float32)

    order = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(in_features)
    blocks_per_row = in_features // block
    if act_order:
        # Static groups: every block's grid from the original weights, before any error is spread.
        scales, zeros = fit_grid(weight.astype(np.float32).reshape(out_features, blocks_per_row, block), bits,
                                 symmetric=symmetric,
                                 importance=importance.reshape(blocks_per_row, block) if weighted_clip else None)
        h = h[order][:, order]
    else:
        scales = np.zeros((out_features, blocks_per_row), np.float32)
        zeros = np.zeros((out_features, blocks_per_row), np.uint8)
    u = _inverse_cholesky(h, mean_diagonal)
    del h

    codes = np.empty((out_features, in_features), np.uint8)
    loop = gptq_native.batch_function() if native and not act_order else None
    # Rows are independent given H: a few thousand at a time keep the working set in cache (the
    # tied table has 50,257 of them).
    with _one_thread():
        for first in range(0, out_features, ROWS):
            rows = slice(first, min(first + ROWS, out_features))
            codes[rows] = _quantize_rows(weight[rows], u, order, scales[rows], zeros[rows], importance, bits, block,
                                         symmetric=symmetric, act_order=act_order, weighted_clip=weighted_clip,
                                         loop=loop)
    return pack(codes, scales, None if symmetric else zeros, bits, block)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: the column loop's products are small and many (thousands a matrix),
    too small to gain from a second thread, and a thread pool's every product waits for both
    threads: with anything else running on a 2-core machine, the loop ran 4x slower on two threads
    than on one. (One fixed thread count also keeps the products' bits the same on every run.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


ROWS = 2048
SUB_BATCH = 16


def _quantize_rows(weight: np.ndarray, u: np.ndarray, order: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                   importance: np.ndarray, bits: int, block: int, *, symmetric: bool, act_order: bool,
                   weighted_clip: bool, loop: gptq_native.BatchFunction | None = None) -> np.ndarray:
    """GPTQ's column loop over some rows; fills their `scales`/`zeros` (unless act_order, where they
    are given) and returns their codes [rows, in]. With `loop` (the native one; not with act_order)
    each batch's columns run there instead of in the numpy loop below."""
    import torch

    qmax = (1 << bits) - 1
    in_features, rows = weight.shape[1], weight.shape[0]
    # Transposed, so that a column of the weight is a contiguous row here. The matrix products run
    # in torch, on its one thread pool (numpy's BLAS has its own, and on a 2-core machine the two
    # pools' threads contend: the products ran 2-3x slower), on buffers torch allocated (aligned
    # alike on every run, so that its BLAS gives the same bits on every run).
    wt = torch.empty((in_features, rows), dtype=torch.float32)
    w = wt.numpy()  # [in, rows]
    w[...] = weight.T[order]
    ut = torch.from_numpy(u)
    codes = np.empty(w.shape, np.uint8)
    # Lazy batches of columns (Frantar et al.'s trick), two levels deep: errors within a sub-batch
    # are spread column by column, onto the rest of the batch once per sub-batch and onto the rest
    # of the matrix once per batch, each as one matrix product. Column-by-column updates of a whole
    # 128-column batch were most of the loop's time on the tied table. A block's grid is fitted at
    # its first column, when every earlier column's error has reached all of its columns: the
    # sub-batch and the block are powers of two, so one of them holds the other.
    batch = block * max(1, 128 // block)
    sub = min(SUB_BATCH, batch)
    spread = np.empty((sub, rows), np.float32)  # one buffer for every column's rank-1 update
    errors_t = torch.empty((batch, rows), dtype=torch.float32)
    errors = errors_t.numpy()
    ratios = np.asarray(clip_ratios(bits), np.float32)
    for start in range(0, in_features, batch):
        stop = min(start + batch, in_features)
        if loop is not None:
            groups = slice(start // block, stop // block)
            loop(w[start:stop], u[start:stop, start:stop], importance[start:stop] if weighted_clip else None, bits,
                 block, symmetric, ratios, scales[:, groups], zeros[:, groups], codes[start:stop],
                 errors[:stop - start])
        # The numpy loop, where the native one did not just quantize the batch's columns.
        for sub_start in range(start, stop, sub) if loop is None else ():
            sub_stop = min(sub_start + sub, stop)
            w1 = w[sub_start:sub_stop]
            u1 = u[sub_start:sub_stop, sub_start:sub_stop]
            for i in range(sub_stop - sub_start):
                column = sub_start + i
                if act_order:
                    g = order[column] // block
                    s, z = scales[:, g], zeros[:, g].astype(np.float32)
                elif column % block == 0:
                    # This block's grid, from its weights as the earlier blocks' errors left them.
                    g = column // block
                    s_, z_ = fit_grid(np.ascontiguousarray(w[column:column + block].T)[:, None, :], bits,
                                      symmetric=symmetric,
                                      importance=importance[column:column + block] if weighted_clip else None)
                    scales[:, g], zeros[:, g] = s_[:, 0], z_[:, 0]
                    s, z = s_[:, 0], z_[:, 0].astype(np.float32)
                x = w1[i]
                q = np.clip(np.round(x / s) + z, 0, qmax)
                codes[column] = q
                error = (x - (q - z) * s) / u1[i, i]
                later = spread[:sub_stop - sub_start - i - 1]
                np.multiply.outer(u1[i, i + 1:], error, out=later)
                w1[i + 1:] -= later
                errors[column - start] = error
            if sub_stop < stop:
                wt[sub_stop:stop].addmm_(ut[sub_start:sub_stop, sub_stop:stop].T,
                                         errors_t[sub_start - start:sub_stop - start], alpha=-1)
        if stop < in_features:
            wt[stop:].addmm_(ut[start:stop, stop:].T, errors_t[:stop - start], alpha=-1)
    unpermuted = np.empty_like(codes)
    unpermuted[order] = codes
    return unpermuted.T


def _inverse_cholesky(h: np.ndarray, mean_diagonal: float) -> np.ndarray:
    """float32 upper Cholesky factor U of h^-1 (h^-1 = U^T U): row i holds how column i's error is
    spread over the later columns. More damping if rounding left h not quite positive definite.

    One factorization and one triangular solve: with J the order reversal and J h J = L L^T,
    h = (J L J)(J L J)^T with J L J upper triangular, so U = (J L J)^-1 = J L^-1 J."""
    import torch

    # J x J as a flipped view, copied once, straight to float32 (an index array would copy the
    # float64 matrix twice: a third of this function's time at 3,072 wide).
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1], np.float32)))
            return torch.flip(_lower_inverse(lower), (0, 1)).numpy()
        except torch.linalg.LinAlgError:
            h = h + np.eye(h.shape[0]) * (mean_diagonal * 10.0 ** (attempt - 3))
    raise ValueError("GPTQ: the calibration inputs' second moment is not positive definite even with damping")


def _lower_inverse(lower: Any) -> Any:
    """The inverse of a lower-triangular torch matrix, a few column blocks at a time. The inverse
    is lower triangular too, so block j's columns need only the solve with the trailing part of
    `lower` from row j on: at 4 blocks this is under half the work of one solve against the whole
    identity (which treats its zeros as data), and a third of `_inverse_cholesky`'s time at 3,072
    wide."""
    import torch

    n = lower.shape[0]
    inverse = torch.zeros((n, n), dtype=lower.dtype)
    step = -(-n // INVERSE_BLOCKS)
    for first in range(0, n, step):
        last = min(first + step, n)
        inverse[first:, first:last] = torch.linalg.solve_triangular(
            lower[first:, first:], torch.eye(n - first, last - first, dtype=lower.dtype), upper=False)
    return inverse


INVERSE_BLOCKS = 4


def refine_codes(quantized: QuantizedTensor, weight: np.ndarray, hessian: np.ndarray, sweeps: int = 2) -> QuantizedTensor:
    """Greedy coordinate descent on GPTQ's result: for each input column in turn, move a row's code
    one step up or down where that lowers the row's output error (w - w')^T H (w - w'). GPTQ
    decides each column once, with only the columns after it left to compensate; a sweep lets the
    later columns' decisions correct the earlier ones. Never increases the error."""
    out_features, in_features = quantized.shape
    block, qmax = quantized.block, (1 << quantized.bits) - 1
    h = np.asarray(hessian, np.float32)
    codes = quantized.codes().astype(np.int16)
    zeros = np.repeat(quantized.zero_point_values().astype(np.float32), block, axis=1)
    scales = np.repeat(quantized.scales, block, axis=1)
    for first in range(0, out_features, ROWS):
        rows = slice(first, min(first + ROWS, out_features))
        c, s = codes[rows], scales[rows]
        error = np.asarray(weight[rows], np.float32) - (c - zeros[rows]) * s  # [rows, in]
        gradient = error @ h  # H e, row by row
        for _ in range(sweeps):
            for j in range(in_features):
                step = s[:, j]
                # Lowering the error by moving w'_j by d*step: 2 d step (He)_j - step^2 H_jj.
                up = 2 * step * gradient[:, j] - step * step * h[j, j]
                down = -2 * step * gradient[:, j] - step * step * h[j, j]
                up[c[:, j] >= qmax] = 0
                down[c[:, j] <= 0] = 0
                move = np.where((up > 0) & (up >= down), 1, np.where(down > 0, -1, 0)).astype(np.int16)
                changed = np.nonzero(move)[0]
                if changed.size == 0:
                    continue
                delta = move[changed] * step[changed]
                c[changed, j] += move[changed]
                error[changed, j] -= delta
                gradient[changed] -= np.multiply.outer(delta, h[j])
        codes[rows] = c
    zero_points = None if quantized.symmetric else quantized.zero_point_values()
    return pack(codes.astype(np.uint8), quantized.scales, zero_points, quantized.bits, block)
