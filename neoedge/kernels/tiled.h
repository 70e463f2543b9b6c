// Tiled weights: MatMulNBits' B and scales rearranged once, in the memory onnxruntime loaded them
// into, so that a vector load gives the AVX-512 VNNI kernels 16 weight rows side by side.
//
// Why: in MatMulNBits' layout a zmm of B holds one row's k, so the decode GEMV needs a block
// epilogue per (activation row, weight row) and a horizontal sum per output, and the batched GEMV
// and the prompt GEMM transpose 16 rows in registers on every call (about as many instructions as
// their vpdpbusd). Tiled, a zmm holds one dword (8 k at 4 bits, 4 at 8) of 16 rows: the products
// land in the lanes of the outputs, and a block's scales apply to 16 outputs per instruction.
//
// Layout, for bits b, K, N, R = K * b / 8 bytes a row and D = R / 4 dwords a row: rows are grouped in
// tiles of 16 (the last one holds h = N mod 16 rows if that is not 0). Tile t starts where its first
// row did (byte 16 t R) and holds its rows' dwords dword-major: dword d of the tile's row r at byte
// 16 t R + (d h + r) * 4, h the tile's height. Bytes within a dword keep their order (at 4 bits the
// low nibble of byte j is k = 8 d + 2 j, the high nibble k + 1). Scales likewise: the scale of
// (row r, block c) of tile t at float 16 t C + c h + r, C = K / block. The sizes do not change, so
// the rearrangement needs no second copy of the weights (which matters at 1.3B and 2.7B).
//
// Only weights without zero-point inputs are tiled (their zero point is 2^(b-1) everywhere), and
// only where the graph says every reader of B and scales is a neoedge kernel (the MatMulNBits
// attribute `rearrange_weights`): GPT-Neo's tied embedding reads the lm_head's B through
// neoedge.kernels::GatherBlockQuantized, which reads either layout (dequantize_row).
#pragma once

#include <cstdint>

namespace neoedge {

constexpr int kTileHeight = 16;

// Rearranges B [N, R] and scales [N, C] into the tiled layout, in place.
void tile_weights(uint8_t* b, float* scales, int64_t n, int64_t k, int bits, int block);

// Row `row` of B ([N, K] at `bits`, tiled or not) into out[K]: (q - zero point) * scale per block,
// scale[c] and, 8-bit only, zp[c] (null: 2^(bits-1)) being the row's own.
void dequantize_row(const uint8_t* b, int64_t n, int64_t k, int bits, int block, bool tiled, int64_t row,
                    const float* scale, const uint8_t* zp, float* out);

}  // namespace neoedge
