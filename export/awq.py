"""AWQ-style activation-aware scaling (Lin et al., 2023), folded exactly into the op before a group.

A few input channels carry most of the activation energy; their weights matter most. Multiplying
input channel j of the weights by s_j > 1 before quantizing gives them a finer share of their
block's grid, and dividing the inputs by s_j undoes it exactly in fp32. The division is folded
into what produces the inputs, so the graph gains no op: a LayerNorm's weight and bias (ln_1 before
q/k/v, ln_2 before c_fc), or the value projection's rows (out_proj reads the attention-weighted
values, which are linear in each value channel). c_proj reads GELU's output and the tied table is
also the token lookup: nothing there can absorb a scale, so they are not scaled.

s = mean|x|^alpha, with alpha searched on a grid per group to minimise the output error on the
calibration inputs, trace(D H D^T) for D the weights' quantization error and H the inputs' second
moment (alpha = 0 is plain round-to-nearest, so the search never does worse than it on those inputs).
"""

from __future__ import annotations

import numpy as np

from .blockwise import QuantizedTensor, quantize_blockwise

ALPHAS = tuple(i / 20 for i in range(20))
# The search scores a sample of the group's rows (every k-th): the error of a few hundred rows
# ranks the alphas as well as all of them, at a fraction of the cost.
SEARCH_ROWS = 512


def search_scales(weight: np.ndarray, hessian: np.ndarray, mean_abs: np.ndarray, bits: int, block: int, *,
                  symmetric: bool, alphas: tuple[float, ...] = ALPHAS) -> np.ndarray:
    """Per-input scales float32 [in] for `weight` [out, in], whose inputs have second moment
    `hessian` [in, in] and mean absolute value `mean_abs` [in]."""
    rows = weight[:: max(1, weight.shape[0] // SEARCH_ROWS)].astype(np.float32)
    h = np.asarray(hessian, np.float32)
    magnitude = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    best, best_error = np.ones(weight.shape[1], np.float32), np.inf
    for alpha in alphas:
        scales = magnitude ** alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        restored = quantize_blockwise(rows * scales, bits, block, symmetric=symmetric).dequantize() / scales
        error = rows - restored
        total = float(np.einsum("oi,oi->", error @ h, error))
        if total < best_error:
            best, best_error = scales, total
    return best


def quantize_scaled(weight: np.ndarray, scales: np.ndarray, importance: np.ndarray, bits: int, block: int, *,
                    symmetric: bool) -> QuantizedTensor:
    """`weight` times the input scales, round-to-nearest with clipping chosen by the error weighted
    by the scaled inputs' energy (`importance` [in] is the unscaled inputs' mean square)."""
    return quantize_blockwise(weight * scales, bits, block, symmetric=symmetric, importance=importance / scales ** 2)
