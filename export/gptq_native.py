"""The native GPTQ column loop (neoedge/kernels/gptq.cpp), through ctypes.

neoedge's kernel library carries it beside its onnxruntime ops, so an export finds it wherever the
runtime's kernels were built. Without the library (no compiler at install time, NEOEDGE_KERNELS=0,
or a library from before this function), or on a CPU without AVX-512, export/gptq.py runs the
same loop in numpy, slower.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

# (w [cols, rows] view of the transposed weight, u [cols, cols] view, importance [cols] or None,
#  bits, block, symmetric, ratios, scales [rows, blocks] view from the batch's first block, zeros
#  likewise, codes [cols, rows] view, errors [cols, rows] view) -> None; every array float32/uint8
#  with contiguous rows.
BatchFunction = Callable[..., None]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


@lru_cache(maxsize=None)
def batch_function() -> BatchFunction | None:
    """The native loop, or None (and why, logged once) if the kernel library cannot provide it."""
    from neoedge import kernels

    function, why = kernels.avx512_function(
        "neoedge_gptq_batch", _INT, [_P, _I64, _I64, _I64, _P, _I64, _P, _INT, _INT, _INT, _P, _INT, _P, _P, _I64, _P, _P])
    if function is None:
        log.info("GPTQ runs its column loop in numpy: %s", why)
        return None

    def run(w: np.ndarray, u: np.ndarray, importance: np.ndarray | None, bits: int, block: int, symmetric: bool,
            ratios: np.ndarray, scales: np.ndarray, zeros: np.ndarray, codes: np.ndarray, errors: np.ndarray) -> None:
        cols, rows = w.shape
        expected = [(w, np.float32, (cols, rows)), (codes, np.uint8, (cols, rows)), (errors, np.float32, (cols, rows)),
                    (u, np.float32, (cols, cols)), (scales, np.float32, (rows, cols // block)),
                    (zeros, np.uint8, (rows, cols // block)), (ratios, np.float32, ratios.shape)]
        if importance is not None:
            expected.append((importance, np.float32, (cols,)))
        for array, dtype, shape in expected:
            if array.dtype != dtype or array.shape != shape or array.strides[-1] != array.itemsize:
                raise ValueError(f"GPTQ native loop: expected {np.dtype(dtype)} {shape} with contiguous rows, got "
                                 f"{array.dtype} {array.shape} strides {array.strides}")
        # One row stride (in elements) for the weights, codes and errors; one for scales and zeros.
        ld, ld_grid = w.strides[0] // 4, zeros.strides[0]
        if codes.strides[0] != ld or errors.strides[0] != 4 * ld or scales.strides[0] != 4 * ld_grid:
            raise ValueError("GPTQ native loop: weights, codes and errors (or scales and zeros) of different strides")
        status = function(w.ctypes.data, rows, cols, ld, u.ctypes.data, u.strides[0] // 4,
                          None if importance is None else importance.ctypes.data, bits, block, int(symmetric),
                          ratios.ctypes.data, len(ratios), scales.ctypes.data, zeros.ctypes.data, ld_grid,
                          codes.ctypes.data, errors.ctypes.data)
        if status != 0:
            raise ValueError(f"GPTQ native loop refused its arguments (rows {rows}, columns {cols}, block {block})")

    return run
