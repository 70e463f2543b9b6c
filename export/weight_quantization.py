"""The quantization step: every weight MatMul and the tied embedding/lm_head table of a GPT-Neo,
quantized block-wise for MatMulNBits before the graph is built.

Returns the weights as the graph stores them and the manifest's record of what was done, so the
graph builder only places tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .blockwise import QuantizedTensor, quantize_blockwise
from .scheme import QuantizationScheme
from .weights import Tensor, Weights

TABLE = "transformer.wte.weight"
# Every weight MatMul of a block, by its transformers name under transformer.h.{i}.
LINEARS = ("attn.attention.q_proj.weight", "attn.attention.k_proj.weight", "attn.attention.v_proj.weight",
           "attn.attention.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class QuantizedWeights:
    weights: Weights  # the weight MatMuls and the table as QuantizedTensors, the rest fp32
    settings: dict[str, Any]  # the manifest's quantization settings


def quantize_weights(weights: Weights, scheme: QuantizationScheme | None, num_layers: int, *,
                     on_layer: Callable[[], None] | None = None) -> QuantizedWeights:
    """Quantize every weight MatMul (layer by layer; `on_layer` is called after each) and the table.
    With no scheme (fp32) the weights are returned as they are."""
    if scheme is None:
        return QuantizedWeights(weights, {})
    blocks_used: set[int] = set()

    def quantize(name: str, bits: int) -> QuantizedTensor:
        weight = weights[name]
        block = scheme.block_for(weight.shape[1])
        blocks_used.add(block)
        return quantize_blockwise(weight, bits, block, symmetric=scheme.symmetric)

    updates: dict[str, Tensor] = {TABLE: quantize(TABLE, scheme.lm_head_bits)}
    for layer in range(num_layers):
        for name in LINEARS:
            full = f"transformer.h.{layer}.{name}"
            updates[full] = quantize(full, scheme.bits)
        if on_layer is not None:
            on_layer()
    return QuantizedWeights(weights.replaced(updates), scheme.settings(blocks_used))
