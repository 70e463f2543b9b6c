// AVX-512 VNNI over tiled weights (tiled.h): a zmm of B is one dword of 16 weight rows, so the
// products of an activation row land in the lanes of 16 outputs.
//
// Decode (M <= 16): per tile, per block, each activation row keeps one int32 vector of 16 sums;
// at 4 bits the dword's low nibbles (even k) and high nibbles (odd k) each meet a broadcast of 4
// activation bytes (RowActivations' even/odd order). The block's epilogue is one multiply-add per
// row for 16 outputs, and the outputs are stored as they are: no horizontal sums, no per-call
// transposes. A tile's bytes are contiguous, so each task reads one sequential stream. Every row
// runs the same instructions whatever M is, so a batch's rows equal batch-1 results bit for bit.
//
// Prompt GEMM: stage_tiled_group writes avx512.cpp's staged layout from a tiled tile with loads and
// nibble masks only (the activations then come in the same even/odd order).
#include "avx512_blocks.h"
#include "tiled.h"

#if NEO_X86

#include <algorithm>

namespace neoedge {
namespace x86 {

namespace {

constexpr int kRowsPerPass = 8;  // activation rows per pass over a tile (sums and outputs in registers)

// MR activation rows from m0 against tile t. FULL: 16 rows in the tile (plain loads). The sums and
// outputs are named variables: GCC 12 keeps arrays of __m512i on the stack (see avx512_batch.cpp).
template <int BITS, int MR, bool FULL>
NEO_AVX512 void tile_rows(const Problem& p, const RowActivations& act, int64_t t, int64_t m0) {
  static_assert(MR >= 1 && MR <= kRowsPerPass, "rows per pass");
  constexpr int k_per_dword = BITS == 4 ? 8 : 4;
  const int64_t n0 = t * kTileHeight, h = FULL ? kTileHeight : p.n - n0, blocks = p.blocks();
  const __mmask16 lanes = FULL ? 0xFFFF : static_cast<__mmask16>((1u << h) - 1);
  const uint8_t* w = p.b + n0 * p.row_bytes();
  const float* w_scales = p.scales + n0 * blocks;
  const int8_t* x = act.q + m0 * p.k;
  const int64_t dwords_per_block = p.block / k_per_dword, k = p.k;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 zp = _mm512_set1_ps(static_cast<float>(1 << (BITS - 1)));
#define NEO_DECLARE(i) [[maybe_unused]] __m512 y##i = _mm512_setzero_ps();
  NEO_DECLARE(0) NEO_DECLARE(1) NEO_DECLARE(2) NEO_DECLARE(3) NEO_DECLARE(4) NEO_DECLARE(5) NEO_DECLARE(6)
  NEO_DECLARE(7)
#undef NEO_DECLARE
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    // One row alone: four chains (dword parity x nibble half), since one chain would wait on each
    // vpdpbusd's latency.
    __m512i e0 = s0, e1 = s0, e2 = s0;
    for (int64_t j = 0; j < dwords_per_block; ++j) {
      const int64_t d = b * dwords_per_block + j;
      const __m512i v = FULL ? _mm512_loadu_si512(w + d * 64) : _mm512_maskz_loadu_epi32(lanes, w + d * h * 4);
      const int8_t* xd = x + d * k_per_dword;
      if constexpr (BITS == 4) {
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        if constexpr (MR == 1) {
          if (j & 1) {
            dpbusd_broadcast(e1, lo, xd);
            dpbusd_broadcast(e2, hi, xd + 4);
          } else {
            dpbusd_broadcast(s0, lo, xd);
            dpbusd_broadcast(e0, hi, xd + 4);
          }
        } else {
#define NEO_ROW(i)                                   \
  if constexpr (MR > i) {                            \
    dpbusd_broadcast(s##i, lo, xd + i * k);          \
    dpbusd_broadcast(s##i, hi, xd + i * k + 4);      \
  }
          NEO_ROW(0) NEO_ROW(1) NEO_ROW(2) NEO_ROW(3) NEO_ROW(4) NEO_ROW(5) NEO_ROW(6) NEO_ROW(7)
#undef NEO_ROW
        }
      } else {
        if constexpr (MR == 1) {
          if (j & 1) dpbusd_broadcast(e0, v, xd);
          else dpbusd_broadcast(s0, v, xd);
        } else {
#define NEO_ROW(i) \
  if constexpr (MR > i) dpbusd_broadcast(s##i, v, xd + i * k);
          NEO_ROW(0) NEO_ROW(1) NEO_ROW(2) NEO_ROW(3) NEO_ROW(4) NEO_ROW(5) NEO_ROW(6) NEO_ROW(7)
#undef NEO_ROW
        }
      }
    }
    if constexpr (MR == 1) s0 = _mm512_add_epi32(_mm512_add_epi32(s0, e0), _mm512_add_epi32(e1, e2));
    const __m512 ws = FULL ? _mm512_loadu_ps(w_scales + b * kTileHeight) : _mm512_maskz_loadu_ps(lanes, w_scales + b * h);
    // y += w_scale * (a_scale * sum - zp * a_scale * sum q): the implicit zero point folded in.
#define NEO_EPILOGUE(i)                                                                               \
  if constexpr (MR > i) {                                                                             \
    const float* as = act.scale + (m0 + i) * blocks + b;                                              \
    const float* ss = act.scaled_sum + (m0 + i) * blocks + b;                                         \
    const __m512 u = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s##i), _mm512_set1_ps(*as), _mm512_mul_ps(zp, _mm512_set1_ps(*ss))); \
    y##i = _mm512_fmadd_ps(u, ws, y##i);                                                              \
  }
    NEO_EPILOGUE(0) NEO_EPILOGUE(1) NEO_EPILOGUE(2) NEO_EPILOGUE(3) NEO_EPILOGUE(4) NEO_EPILOGUE(5)
    NEO_EPILOGUE(6) NEO_EPILOGUE(7)
#undef NEO_EPILOGUE
  }
#define NEO_STORE(i) \
  if constexpr (MR > i) store_lanes(p.y + (m0 + i) * p.n + n0, lanes, y##i);
  NEO_STORE(0) NEO_STORE(1) NEO_STORE(2) NEO_STORE(3) NEO_STORE(4) NEO_STORE(5) NEO_STORE(6) NEO_STORE(7)
#undef NEO_STORE
}

template <int BITS, bool FULL>
NEO_AVX512 void tile_all_rows(const Problem& p, const RowActivations& act, int64_t t) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kRowsPerPass) {
    switch (std::min<int64_t>(kRowsPerPass, p.m - m0)) {
      case 1: tile_rows<BITS, 1, FULL>(p, act, t, m0); break;
      case 2: tile_rows<BITS, 2, FULL>(p, act, t, m0); break;
      case 3: tile_rows<BITS, 3, FULL>(p, act, t, m0); break;
      case 4: tile_rows<BITS, 4, FULL>(p, act, t, m0); break;
      case 5: tile_rows<BITS, 5, FULL>(p, act, t, m0); break;
      case 6: tile_rows<BITS, 6, FULL>(p, act, t, m0); break;
      case 7: tile_rows<BITS, 7, FULL>(p, act, t, m0); break;
      default: tile_rows<BITS, 8, FULL>(p, act, t, m0); break;
    }
  }
}

struct TiledJob {
  const Problem* p;
  RowActivations act;
  int64_t tiles_per_task;
};

void tiled_task(void* user, size_t task) {
  const TiledJob& job = *static_cast<const TiledJob*>(user);
  const Problem& p = *job.p;
  const int64_t full = p.n / kTileHeight, tiles = (p.n + kTileHeight - 1) / kTileHeight;
  const int64_t t0 = static_cast<int64_t>(task) * job.tiles_per_task;
  const int64_t t1 = std::min<int64_t>(tiles, t0 + job.tiles_per_task);
  for (int64_t t = t0; t < t1; ++t) {
    p.tiled->ensure(t);
    if (p.bits == 4) {
      if (t < full) tile_all_rows<4, true>(p, job.act, t);
      else tile_all_rows<4, false>(p, job.act, t);
    } else {
      if (t < full) tile_all_rows<8, true>(p, job.act, t);
      else tile_all_rows<8, false>(p, job.act, t);
    }
  }
}

}  // namespace

NEO_AVX512 bool tiled_gemv(const Problem& p, const Parallel& parallel) {
  TiledJob job{&p, quantize_rows(p), 0};
  // Tasks of ~32 KB of weights, as the other GEMVs'.
  const int64_t tiles = (p.n + kTileHeight - 1) / kTileHeight;
  job.tiles_per_task = std::max<int64_t>(1, 32768 / (kTileHeight * p.row_bytes()));
  return parallel(tiled_task, static_cast<size_t>((tiles + job.tiles_per_task - 1) / job.tiles_per_task), &job);
}

NEO_AVX512 void stage_tiled_group(const Problem& p, int64_t first, int g, uint8_t* out, float* w_scale,
                                  float* zp_scale) {
  const int64_t blocks = p.blocks(), dwords = p.row_bytes() / 4;
  const int64_t slots = round_up(p.k, 64) / 4;  // 4-k slots staged (zero past K)
  const __m512i low = _mm512_set1_epi8(0x0F);
  const float zp = static_cast<float>(1 << (p.bits - 1));
  uint8_t* group = out + g * kTileHeight * 4;
  const int64_t h = std::min<int64_t>(kTileHeight, p.n - first);
  const __mmask16 lanes = static_cast<__mmask16>(h >= 16 ? 0xFFFF : (1u << h) - 1);
  const uint8_t* w = p.b + first * p.row_bytes();
  int64_t slot = 0;
  for (int64_t d = 0; d < dwords; ++d) {
    const __m512i v = h == kTileHeight ? _mm512_loadu_si512(w + d * 64) : _mm512_maskz_loadu_epi32(lanes, w + d * h * 4);
    if (p.bits == 4) {
      _mm512_storeu_si512(group + (slot++) * kTileRows * 4, _mm512_and_si512(v, low));
      _mm512_storeu_si512(group + (slot++) * kTileRows * 4, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    } else {
      _mm512_storeu_si512(group + (slot++) * kTileRows * 4, v);
    }
  }
  for (; slot < slots; ++slot) _mm512_storeu_si512(group + slot * kTileRows * 4, _mm512_setzero_si512());
  const float* s = p.scales + first * blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 ws = _mm512_maskz_loadu_ps(lanes, s + b * h);
    _mm512_storeu_ps(w_scale + b * kTileRows + g * kTileHeight, ws);
    if (zp_scale) _mm512_storeu_ps(zp_scale + b * kTileRows + g * kTileHeight, _mm512_mul_ps(ws, _mm512_set1_ps(zp)));
  }
}

}  // namespace x86
}  // namespace neoedge

#endif
