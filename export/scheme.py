"""A quantization scheme: the options of `neoedge export --quantize`, validated once, with the
defaults chosen by measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("none", "int8", "int4")
# Chosen by measurement (benchmarks/quality.py on the trained model, benchmarks/suite.py for speed):
# int4 at block 128 without zero points decoded 1.2-1.6x faster than block 32 with them, at +1.1%
# perplexity on the trained model (the quantization target is +2%); `--block-size 32 --asymmetric`
# is the closest to the model and `--lm-head-bits 8` the cheapest large quality gain.
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 128}
DEFAULT_SYMMETRIC = {"int8": False, "int4": True}


@dataclass(frozen=True)
class QuantizationScheme:
    """Block-wise weight-only quantization for onnxruntime's MatMulNBits (4 or 8 bits).

    Each block of `block_size` consecutive input weights of an output row gets its own scale, and
    with `symmetric=False` its own zero point. With accuracy_level 4 the kernel quantizes the
    activations to int8 on the fly, so the products run as int8 dot products (VNNI on x86, SDOT on
    arm64). The tied embedding/lm_head table is stored once at `lm_head_bits`.
    """

    bits: int
    block_size: int
    lm_head_bits: int
    symmetric: bool
    # A default block size shrinks (halving) to fit a weight whose width it does not divide;
    # a block size the user asked for is used as given or refused.
    fit_block: bool = False
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        for b in (self.bits, self.lm_head_bits):
            if b not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {b}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def block_for(self, in_features: int) -> int:
        block = self.block_size
        while self.fit_block and in_features % block and block > 16:
            block //= 2
        return block

    def settings(self, blocks_used: set[int]) -> dict[str, Any]:
        """The manifest's record of the scheme, with the blocks the weights actually got."""
        used = sorted(blocks_used) or [self.block_size]
        return {"method": "MatMulNBits", "bits": self.bits,
                "block_size": used[0] if len(used) == 1 else used,
                "lm_head_bits": self.lm_head_bits, "accuracy_level": self.accuracy_level,
                "zero_point": "symmetric" if self.symmetric else "asymmetric",
                "embedding": "tied, shared with lm_head"}


def make_scheme(scheme: str, *, block_size: int | None = None, lm_head_bits: int | None = None,
                symmetric: bool | None = None) -> QuantizationScheme | None:
    """The scheme named by `--quantize` with its options (None for fp32). Raises ValueError."""
    if scheme == "none":
        return None
    if scheme in ("int8", "int4"):
        bits = int(scheme[3:])
        return QuantizationScheme(bits, block_size or DEFAULT_BLOCK_SIZE[scheme], lm_head_bits or bits,
                                  DEFAULT_SYMMETRIC[scheme] if symmetric is None else symmetric,
                                  fit_block=block_size is None)
    raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
