"""A quantization scheme: the options of `neoedge export --quantize`, validated once, with the
defaults chosen by measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SCHEMES = ("none", "int8", "int4")
# How the codes and scales are chosen (benchmarks/quality.py measures each):
# - rtn: round-to-nearest, each block's clipping by its plain squared error; needs no calibration.
# - weighted-clip: round-to-nearest, clipping by the error weighted by each input's mean square on
#   the calibration text (importance-weighted, as llama.cpp's imatrix).
# - awq: activation-aware input scaling folded into the op before each group (awq.py), then
#   weighted clipping.
# - gptq: second-order error compensation, column by column (gptq.py).
Algorithm = Literal["rtn", "weighted-clip", "awq", "gptq"]
ALGORITHMS: tuple[Algorithm, ...] = ("rtn", "weighted-clip", "awq", "gptq")
# Chosen by measurement (benchmarks/quality.py on the trained model, benchmarks/suite.py for speed):
# int4 at block 128 without zero points decoded 1.2-1.6x faster than block 32 with them, at +1.1%
# perplexity on the trained model (the quantization target is +2%); `--block-size 32 --asymmetric`
# is the closest to the model and `--lm-head-bits 8` the cheapest large quality gain.
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 128}
DEFAULT_SYMMETRIC = {"int8": False, "int4": True}
DEFAULT_ALGORITHM: dict[str, Algorithm] = {"int8": "gptq", "int4": "gptq"}


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
    algorithm: Algorithm = "rtn"
    # gptq: the fraction of H's mean diagonal added to it (keeps it invertible, and the weights
    # from following the calibration inputs too closely), and whether columns go by decreasing H
    # diagonal (with block grids fixed up front, so the layout is the same).
    damping: float = 0.01
    act_order: bool = False
    # Data-aware algorithms: the tied table serves the lm_head, whose inputs' second moment the
    # calibration text shows, and the token lookup, whose rows' errors are weighed by the empirical
    # Fisher of the embeddings (layerwise.embedding_fisher, on `fisher_sequences` calibration
    # sequences): the table's H is H_lm + lookup_weight * F. With lookup_weight 0 the lookup's share
    # is instead table_damping times the lm_head inputs' mean square on every channel.
    table_damping: float = 0.1
    lookup_weight: float = 1.0
    fisher_sequences: int = 8
    # The table's own algorithm, if not `algorithm` (measured; see benchmarks/quality.py).
    table_algorithm: Algorithm | None = None
    # Data-aware algorithms: refit every block's scale to its codes by least squares in the
    # output error, and give the token lookup its own scales for the table's codes.
    refit: bool = True
    lookup_scales: bool = True
    # gptq: sweeps of greedy code refinement after GPTQ (gptq.refine_codes), on the table / everywhere.
    table_sweeps: int = 0
    sweeps: int = 0

    def __post_init__(self) -> None:
        for b in (self.bits, self.lm_head_bits):
            if b not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {b}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown quantization algorithm {self.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
        if self.table_algorithm is not None and self.table_algorithm not in ALGORITHMS:
            raise ValueError(f"unknown table algorithm {self.table_algorithm!r}")
        if not 0 < self.damping <= 1 or not 0 <= self.table_damping:
            raise ValueError(f"damping must be in (0, 1] and table_damping >= 0, got {self.damping}, {self.table_damping}")

    @property
    def data_aware(self) -> bool:
        """Whether the weights are chosen from calibration activations."""
        return self.algorithm != "rtn"

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def block_for(self, in_features: int) -> int:
        block = self.block_size
        while self.fit_block and in_features % block and block > 16:
            block //= 2
        if self.fit_block and in_features % block:
            raise ValueError(f"no MatMulNBits block fits weights with {in_features} inputs (blocks are powers "
                             "of two from 16 that divide them): this model can only be exported unquantized")
        return block


def make_scheme(scheme: str, *, block_size: int | None = None, lm_head_bits: int | None = None,
                symmetric: bool | None = None, algorithm: str | None = None) -> QuantizationScheme | None:
    """The scheme named by `--quantize` with its options (None for fp32). Raises ValueError."""
    if scheme == "none":
        if algorithm is not None:
            raise ValueError(f"--algorithm {algorithm} needs --quantize int8 or int4")
        return None
    if scheme in ("int8", "int4"):
        bits = int(scheme[3:])
        return QuantizationScheme(bits, block_size or DEFAULT_BLOCK_SIZE[scheme], lm_head_bits or bits,
                                  DEFAULT_SYMMETRIC[scheme] if symmetric is None else symmetric,
                                  fit_block=block_size is None, algorithm=algorithm or DEFAULT_ALGORITHM[scheme])
    raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
