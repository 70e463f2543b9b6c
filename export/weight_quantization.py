"""The quantization step: every weight MatMul and the tied embedding/lm_head table of a GPT-Neo,
quantized block-wise for MatMulNBits before the graph is built.

Round-to-nearest needs only the weights. The data-aware algorithms (weighted-clip, awq, gptq; see
scheme.py) quantize inside the calibration pass (layerwise.py), group by group, from the inputs
that the already-quantized model gives each group on the calibration text. Either way the step
returns the weights as the graph stores them, the manifest's record of what was done and, when the
calibration pass ran, the int8 KV cache's scales, so the graph builder only places tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from neoedge.manifest import CalibrationInfo, QuantizationSettings

from .awq import quantize_scaled, search_scales
from .blockwise import QuantizedTable, QuantizedTensor, quantize_blockwise, refit_scales
from .calibrate import CalibrationBatches, kv_cache_scales
from .gptq import gptq_quantize, refine_codes
from .layerwise import LM_HEAD, UNTIED_LM_HEAD, GroupQuantizer, GroupResult, embedding_fisher, run_layers
from .scheme import QuantizationScheme
from .weights import Tensor, Weights

TABLE = "transformer.wte.weight"
UNTIED = "lm_head.weight"  # present in the weights only when the lm_head is not the token table
# Every weight MatMul of a block, by its transformers name under transformer.h.{i}.
LINEARS = ("attn.attention.q_proj.weight", "attn.attention.k_proj.weight", "attn.attention.v_proj.weight",
           "attn.attention.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class QuantizedWeights:
    weights: Weights  # the weight MatMuls and the table as QuantizedTensors (if quantized), the rest fp32
    settings: QuantizationSettings | None  # the manifest's record; None for fp32
    kv_scales: list[tuple[np.ndarray, np.ndarray]] | None  # int8 KV cache scales, if calibrated


def quantize_weights(weights: Weights, scheme: QuantizationScheme | None, num_layers: int, *,
                     model: Any = None, calibration: CalibrationBatches | None = None,
                     on_layer: Callable[[], None] | None = None) -> QuantizedWeights:
    """Quantize every weight MatMul (layer by layer; `on_layer` is called after each) and the table.

    With `calibration` (and the transformers `model` the weights come from), the calibration pass
    runs: it quantizes with the scheme's algorithm (if any scheme) and measures the KV cache scales.
    Without, round-to-nearest quantizes the weights alone, and fp32 (no scheme) returns them as
    they are."""
    if calibration is None:
        if scheme is not None and scheme.data_aware:
            raise ValueError(f"{scheme.algorithm} needs calibration text")
        if scheme is None:
            return QuantizedWeights(weights, None, None)
        return _round_to_nearest(weights, scheme, num_layers, on_layer)
    if model is None:
        raise ValueError("the calibration pass needs the model")
    blocks_used: set[int] = set()
    tied = UNTIED not in weights.arrays
    fisher = None
    if scheme is not None and scheme.data_aware and scheme.lookup_weight > 0 and tied:
        fisher = embedding_fisher(model, calibration.ids[:scheme.fisher_sequences])
    quantizer = _group_quantizer(scheme, blocks_used, fisher) if scheme is not None else None
    result = run_layers(model, calibration.ids, quantizer, tied=tied, on_layer=on_layer)
    kv_scales = kv_cache_scales(result.kv_maxima, model.config.num_heads)
    if scheme is None:
        return QuantizedWeights(weights, None, kv_scales)
    updates = dict(result.updates)
    if not tied:  # the token table alone: a lookup, whose inputs no calibration statistic describes
        updates[TABLE] = _rtn(weights[TABLE], scheme, scheme.lm_head_bits, blocks_used)
    settings = _settings(scheme, blocks_used, tied, calibration.info)
    return QuantizedWeights(weights.replaced(updates), settings, kv_scales)


def _rtn(weight: np.ndarray, scheme: QuantizationScheme, bits: int, blocks_used: set[int]) -> QuantizedTensor:
    block = scheme.block_for(weight.shape[1])
    blocks_used.add(block)
    return quantize_blockwise(weight, bits, block, symmetric=scheme.symmetric)


def _round_to_nearest(weights: Weights, scheme: QuantizationScheme, num_layers: int,
                      on_layer: Callable[[], None] | None) -> QuantizedWeights:
    blocks_used: set[int] = set()

    def quantize(name: str, bits: int) -> QuantizedTensor:
        return _rtn(weights[name], scheme, bits, blocks_used)

    updates: dict[str, Tensor] = {TABLE: quantize(TABLE, scheme.lm_head_bits)}
    tied = UNTIED not in weights.arrays
    if not tied:  # an lm_head of its own, at the lm_head's precision
        updates[UNTIED] = quantize(UNTIED, scheme.lm_head_bits)
    for layer in range(num_layers):
        for name in LINEARS:
            full = f"transformer.h.{layer}.{name}"
            updates[full] = quantize(full, scheme.bits)
        if on_layer is not None:
            on_layer()
    return QuantizedWeights(weights.replaced(updates), _settings(scheme, blocks_used, tied), None)


def _settings(scheme: QuantizationScheme, blocks_used: set[int], tied: bool,
              calibration: CalibrationInfo | None = None) -> QuantizationSettings:
    used = sorted(blocks_used) or [scheme.block_size]
    gptq, data_aware = scheme.algorithm == "gptq", scheme.data_aware
    return QuantizationSettings(
        bits=scheme.bits, block_size=used[0] if len(used) == 1 else tuple(used), lm_head_bits=scheme.lm_head_bits,
        zero_point="symmetric" if scheme.symmetric else "asymmetric", accuracy_level=scheme.accuracy_level,
        algorithm=scheme.algorithm, damping=scheme.damping if gptq else None,
        act_order=scheme.act_order if gptq else None,
        table_damping=scheme.table_damping if data_aware and tied and scheme.lookup_weight == 0 else None,
        lookup_weight=scheme.lookup_weight if data_aware and tied and scheme.lookup_weight > 0 else None,
        fisher_sequences=scheme.fisher_sequences if data_aware and tied and scheme.lookup_weight > 0 else None,
        refit=scheme.refit if scheme.algorithm in ("gptq", "awq") else None,
        lookup_scales=scheme.lookup_scales if data_aware and tied else None,
        calibration=calibration,
        embedding="tied, shared with lm_head" if tied else "untied: lm_head stored separately")


@dataclass(frozen=True)
class _Statistics:
    """A group's inputs on the calibration text."""

    hessian: np.ndarray | None  # float64 [in, in]: mean of x x^T (None when only its diagonal is needed)
    # float64 [in]: the diagonal, and the mean |x|; None when the algorithm reads neither (gptq
    # reads only the hessian: the two sums cost a third of the 3,072-wide c_proj's statistics).
    mean_square: np.ndarray | None
    mean_abs: np.ndarray | None


def _statistics(x: Any, full: bool, moments: bool = True) -> _Statistics:
    import torch

    tokens, width = x.shape
    mean_abs = torch.zeros(width, dtype=torch.float64) if moments else None
    mean_square = torch.zeros(width, dtype=torch.float64) if moments else None
    hessian = torch.zeros((width, width), dtype=torch.float64) if full else None
    # X^T X is symmetric: on a wide input (c_proj's 4 x hidden, the largest product of the
    # calibration statistics) only its upper blocks are computed, then mirrored.
    step = width if width <= HESSIAN_BLOCK else HESSIAN_BLOCK
    # float32 products of a few thousand tokens at a time, summed in float64.
    for start in range(0, tokens, 4096):
        chunk = x[start:start + 4096]
        if moments:
            mean_abs += chunk.abs().sum(0, dtype=torch.float64)
            mean_square += chunk.square().sum(0, dtype=torch.float64)
        if hessian is not None:
            for first in range(0, width, step):
                hessian[first:first + step, first:] += (chunk[:, first:first + step].T @ chunk[:, first:]).double()
    if hessian is not None and step < width:
        for first in range(step, width, step):
            hessian[first:first + step, :first] = hessian[:first, first:first + step].T
    return _Statistics(None if hessian is None else (hessian / tokens).numpy(),
                       None if mean_square is None else (mean_square / tokens).numpy(),
                       None if mean_abs is None else (mean_abs / tokens).numpy())


HESSIAN_BLOCK = 768


def _group_quantizer(scheme: QuantizationScheme, blocks_used: set[int], fisher: np.ndarray | None) -> GroupQuantizer:
    def quantize(group: str, layer: int, weights: list[np.ndarray], x: Any, foldable: bool) -> GroupResult:
        head = group in (LM_HEAD, UNTIED_LM_HEAD)
        algorithm = (scheme.table_algorithm or scheme.algorithm) if head else scheme.algorithm
        bits = scheme.lm_head_bits if head else scheme.bits
        block = scheme.block_for(weights[0].shape[1])
        blocks_used.add(block)
        if algorithm == "rtn":
            return GroupResult([quantize_blockwise(w, bits, block, symmetric=scheme.symmetric) for w in weights])
        # gptq reads only the hessian, except for the tied table without a Fisher (its lookup share
        # is a multiple of the mean square).
        stats = _statistics(x, full=algorithm in ("gptq", "awq"),
                            moments=algorithm != "gptq" or (group == LM_HEAD and fisher is None))
        if group == LM_HEAD:
            stats = _with_lookup(stats, scheme.table_damping) if fisher is None else \
                _with_fisher(stats, scheme.lookup_weight * fisher)
        stacked = weights[0] if len(weights) == 1 else np.concatenate(weights)
        scales = None
        if algorithm == "gptq":
            quantized = gptq_quantize(stacked, stats.hessian, bits, block, symmetric=scheme.symmetric,
                                      damping=scheme.damping, act_order=scheme.act_order)
        elif algorithm == "awq" and foldable:
            scales = search_scales(stacked, stats.hessian, stats.mean_abs, bits, block, symmetric=scheme.symmetric)
            quantized = quantize_scaled(stacked, scales, stats.mean_square.astype(np.float32), bits, block,
                                        symmetric=scheme.symmetric)
        else:  # weighted-clip, and awq where nothing can absorb a scale
            quantized = quantize_blockwise(stacked, bits, block, symmetric=scheme.symmetric,
                                           importance=stats.mean_square.astype(np.float32))
        sweeps = scheme.table_sweeps if head else scheme.sweeps
        if algorithm == "gptq" and sweeps:
            quantized = refine_codes(quantized, stacked, stats.hessian, sweeps)
        if scheme.refit and stats.hessian is not None:
            target = stacked if scales is None else stacked * scales
            hessian = stats.hessian if scales is None else stats.hessian / np.outer(scales, scales)
            quantized = replace(quantized, scales=refit_scales(quantized, target, hessian))
        if group == LM_HEAD and scheme.lookup_scales:
            lookup = refit_scales(quantized, stacked, fisher)
            quantized = QuantizedTable(quantized.packed, quantized.scales, quantized.zero_points, quantized.bits,
                                       quantized.block, lookup_scales=lookup)
        if len(weights) == 1:
            return GroupResult([quantized], scales)
        parts, start = [], 0
        for w in weights:
            parts.append(quantized.rows(start, start + w.shape[0]))
            start += w.shape[0]
        return GroupResult(parts, scales)

    return quantize


def _with_lookup(stats: _Statistics, share: float) -> _Statistics:
    """The tied table's statistics: the lm_head inputs', plus the token lookup's, which weighs
    every hidden channel alike (`share` of the mean square added to each channel)."""
    extra = share * float(stats.mean_square.mean())
    hessian = None
    if stats.hessian is not None:
        hessian = stats.hessian.copy()
        hessian[np.diag_indices(hessian.shape[0])] += extra
    return _Statistics(hessian, stats.mean_square + extra, stats.mean_abs)


def _with_fisher(stats: _Statistics, fisher: np.ndarray) -> _Statistics:
    """The tied table's statistics: the lm_head inputs' second moment plus the lookup's Fisher."""
    hessian = None if stats.hessian is None else stats.hessian + fisher
    mean_square = None if stats.mean_square is None else stats.mean_square + np.diagonal(fisher)
    return _Statistics(hessian, mean_square, stats.mean_abs)
