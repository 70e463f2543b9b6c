"""A GPT-Neo's weights by their transformers names, as the graph stores them: fp32 arrays, or
block-wise quantized tensors once the quantization step has made them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .blockwise import QuantizedTensor

Tensor = np.ndarray | QuantizedTensor


@dataclass(frozen=True)
class Weights:
    """Weights in torch's layout (Linear weights are [out, in]), by transformers' parameter names."""

    arrays: Mapping[str, Tensor]

    def __getitem__(self, name: str) -> Tensor:
        return self.arrays[name]

    def layer(self, index: int, name: str) -> Tensor:
        return self.arrays[f"transformer.h.{index}.{name}"]

    def replaced(self, updates: Mapping[str, Tensor]) -> Weights:
        """These weights with some of them replaced (the originals are left as they are)."""
        unknown = set(updates) - set(self.arrays)
        if unknown:
            raise KeyError(f"no such weights: {sorted(unknown)}")
        return Weights({**self.arrays, **updates})


def stack_outputs(parts: list[Tensor]) -> Tensor:
    """Weights with the same inputs as one [sum of outputs, in] weight (q, k and v as one packed
    projection), fp32 or quantized alike."""
    if all(isinstance(p, QuantizedTensor) for p in parts):
        return QuantizedTensor.concat_rows(parts)
    if any(isinstance(p, QuantizedTensor) for p in parts):
        raise ValueError("cannot stack fp32 and quantized weights")
    return np.concatenate(parts, axis=0)
