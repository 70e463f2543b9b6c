// Tiled weights: MatMulNBits' B and scales rearranged once, in the memory onnxruntime mapped them
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
// only where the graph says every reader of B and scales reads tiles (the MatMulNBits attribute
// `rearrange_weights`): GPT-Neo's tied embedding reads the lm_head's B through
// neoedge.kernels::GatherBlockQuantized, which reads either layout (dequantize_row). At run time
// tiled_registry.h keeps any weights another kernel reads as they are, whatever the graph says.
#pragma once

#include <atomic>
#include <cstdint>

namespace neoedge {

constexpr int kTileHeight = 16;

// B and scales of one MatMulNBits node, rearranged tile by tile by the first call (or table gather)
// that reads a tile, not when the session is created: rearranging a 1.3B's 700 MB up front added
// 0.7 s to its cold start; within its first prompt, which reads every weight anyway, 0.1-0.3 s
// (the copy of each page written, see tiled.cpp). Reading a tile in the old layout first and
// rearranging it later costs more: the write to a page already mapped read-only needs a TLB
// shootdown (see tiled.cpp; the first decode step after a prompt read the old layout took 1.35 s
// on the 1.3B).
// A tile's bytes are its own rows' (tile t: rows 16 t .. 16 t + h), so tiles are independent.
struct TiledWeights {
  static constexpr uint8_t kPlain = 0, kTiling = 1, kTiled = 2;
  uint8_t* b;
  float* scales;
  int64_t n, k, bits, block;
  std::atomic<uint8_t>* states;  // one per tile

  int64_t tiles() const { return (n + kTileHeight - 1) / kTileHeight; }
  // Returns once tile t is in the tiled layout (rearranging it, or waiting for the thread that is).
  void ensure(int64_t t) const;
};

// Row `row` of B ([N, K] at `bits`, tiled or not) into out[K]: (q - zero point) * scale per block,
// scale[c] and, 8-bit only, zp[c] (null: 2^(bits-1)) being the row's own.
void dequantize_row(const uint8_t* b, int64_t n, int64_t k, int bits, int block, bool tiled, int64_t row,
                    const float* scale, const uint8_t* zp, float* out);

}  // namespace neoedge
