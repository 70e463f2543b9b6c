// Shared by the x86 paths: per-function target attributes (the library is compiled for the baseline
// ISA and each fast function carries its own target, chosen at run time) and the layout of the
// activations the GEMM paths read.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define NEO_X86 1

#include <cstdint>

#include "qgemm.h"

#if defined(_MSC_VER) && !defined(__clang__)
#define NEO_TARGET(x)
#define NEO_INLINE __forceinline
#else
#define NEO_TARGET(x) __attribute__((target(x)))
#define NEO_INLINE inline __attribute__((always_inline))
#endif

#define NEO_AVX2 NEO_TARGET("avx2,fma,f16c,bmi,bmi2")
#define NEO_AVXVNNI NEO_TARGET("avx2,fma,f16c,bmi,bmi2,avxvnni")
#define NEO_AVX512 NEO_TARGET("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define NEO_AMX NEO_TARGET("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")

namespace neoedge {
namespace x86 {

// The AMX tile configuration LDTILECFG reads (palette 1): bytes per row and rows of each tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kTileRows = 32;     // weight rows per GEMM task
constexpr int64_t kMChunk = 256;  // activation rows per GEMM task, at most

// Activations prepared once per call for the GEMM paths, shared read-only by every task: int8 rows
// in k order (K padded to 64 with zeros, rows padded to 16 with zero rows and zero scales).
struct GemmActivations {
  const int8_t* q;          // [m_pad, stride]; k64 = K padded to 64 bytes used per row
  const float* scale;       // [m_pad, blocks_pad]: a_scale of (m, b)
  const float* scaled_sum;  // [m_pad, blocks_pad]: a_scale * sum of q over the block
  int64_t m_pad, k64, blocks_pad;
  // Row stride: k64 plus one cache line, so the 16 rows of a tile load never share L1 sets (a
  // power-of-two stride such as 2048 made them collide and cost 3x).
  int64_t stride;
};

// Activations of a few rows (the decode GEMVs over 16 weight rows a vector), quantized per block
// in k order or, at 4 bits, per 8 k the 4 even k then the 4 odd ones: the order of the low and high
// nibbles of a dword of packed weights.
struct RowActivations {
  const int8_t* q;          // [m, k]
  const float* scale;       // [m, blocks]
  const float* scaled_sum;  // [m, blocks]: a_scale * sum of q over the block
};
// Into buffers of the calling thread.
RowActivations quantize_rows(const Problem& p);

// Batched decode (avx512_batch.cpp): up to kMaxBatchRows rows, weights transposed per block in
// registers so that the lanes hold 16 weight rows. Applies to blocks of whole 128-k (4-bit) or 64-k
// (8-bit) units up to 256.
constexpr int64_t kMaxBatchRows = 16;
bool batch_gemv_applies(const Problem& p);
bool batch_gemv(const Problem& p, const Parallel& parallel, bool amx);

// Tiled weights (tiled.h, avx512_tiled.cpp): decode rows (M <= kMaxBatchRows) over 16 weight rows a
// vector, and the prompt GEMM's staging of 16 rows from a tiled tile.
bool tiled_gemv(const Problem& p, const Parallel& parallel);
// Rows [first, first + 16) of a stage tile (group g of its two) from a tile already tiled.
NEO_AVX512 void stage_tiled_group(const Problem& p, int64_t first, int g, uint8_t* out, float* w_scale,
                                  float* zp_scale);

// Quantizes A in parallel over groups of 16 rows, into buffers of the calling thread.
bool prepare_gemm_activations(const Problem& p, const Parallel& parallel, GemmActivations* out);

// The GEMM over prepared activations, on AMX tiles. False if the pool failed.
bool amx_gemm(const Problem& p, const Parallel& parallel, const GemmActivations& act);

// Weight rows n0..n0+31 in VNNI order, the B operand of vpdpbusd and AMX tiles: for each 4 k, the
// 4 bytes of every row side by side, out[(k / 4) * 32 * 4 + row * 4 + k % 4] (K padded to 64,
// rows past N zero). 4-bit values unpacked; with `centre` minus their zero points (4-bit only: the
// signed products then need no correction). w_scale[b * 32 + row] gets the block scales and, if
// zp_scale is not null, zp_scale[b * 32 + row] = zero point x scale.
NEO_AVX512 void stage_tile(const Problem& p, int64_t n0, bool centre, uint8_t* out, float* w_scale, float* zp_scale);

// The tasks accumulate a tile of outputs, rows m0..m1 x 32 weight rows, in acc[(m - m0) * 32 + n]:
// contiguous, where Y's rows (N floats apart, often a power of two) would collide in the caches.
// init: acc = -sum_b scaled_sum[m, b] * zp_scale[b, n], the zero-point correction of unsigned
// weights, which the block products then add to.
NEO_AVX512 void init_outputs(const GemmActivations& act, int64_t blocks, int64_t m0, int64_t m1, const float* zp_scale,
                             float* acc);
// Y[m, n0 + n] = acc for the valid weight rows.
NEO_AVX512 void store_outputs(const Problem& p, int64_t n0, int64_t m0, int64_t m1, const float* acc);

}  // namespace x86
}  // namespace neoedge

#endif
