// AMX-int8 GEMM (Sapphire Rapids and later), the AVX-512 GEMM's task structure on tiles.
//
// Per task: 32 weight rows staged in VNNI order (avx512.cpp's stage_tile), then for each k-block
// and each 32 activation rows a 2 x 2 block of C tiles [16 m][16 n]: A tiles are 16 activation
// rows x 64 k as quantized (row-major, no rearranging), B tiles 16 groups of 4 k x 16 weight rows.
// 4-bit weights are staged minus their zero points, so TDPBSSD (signed x signed) needs no
// correction; 8-bit ones stay unsigned (TDPBSUD) and Y starts from the zero-point correction. After
// each k-block the C tiles are scaled into Y in fp32.
#include "x86.h"

#if NEO_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace neoedge {
namespace x86 {

namespace {

// tmm0-3: C (16 x 16 int32); tmm4-5: activations (16 rows x kstep bytes); tmm6-7: weights
// (kstep / 4 rows x 64 bytes).
TileConfig tile_config(int kstep) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(kstep);
  for (int t = 6; t < 8; ++t) c.rows[t] = static_cast<uint8_t>(kstep / 4), c.colsb[t] = 64;
  return c;
}

struct Job {
  const Problem* p;
  GemmActivations act;
  int64_t n_tiles, m_chunks;
};

// acc[m][16 n] (+)= a_scale[m] * w_scale[n] * c[m][n] for the rows of one 16 x 16 tile.
NEO_AMX NEO_INLINE void tile_epilogue(const int32_t* c, const float* a_scale, int64_t a_stride, __m512 w_scale,
                                      int rows, float* acc, bool first) {
  for (int r = 0; r < rows; ++r) {
    float* out = acc + r * kTileRows;
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + r * 16)), _mm512_set1_ps(a_scale[r * a_stride]));
    _mm512_storeu_ps(out, first ? _mm512_mul_ps(t, w_scale) : _mm512_fmadd_ps(t, w_scale, _mm512_loadu_ps(out)));
  }
}

// The resident-weights layout (blocks up to 128, the defaults): per k-block the 32 weight rows stay
// in tmm4-7 (two k-steps x two 16-row halves), each 16 activation rows are loaded once (tmm2/3) and
// multiply both halves into tmm0/1. Every step's products are issued before the previous step's
// epilogue runs, so the tile unit works while the vector units scale.
TileConfig resident_config(int kstep) {
  TileConfig c;
  for (int t = 0; t < 2; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  for (int t = 2; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(kstep);
  for (int t = 4; t < 8; ++t) c.rows[t] = static_cast<uint8_t>(kstep / 4), c.colsb[t] = 64;
  return c;
}

template <int KK>
NEO_AMX NEO_INLINE void load_weights(const uint8_t* w, int kstep) {
  _tile_loadd(4, w, kTileRows * 4);
  _tile_loadd(5, w + 64, kTileRows * 4);
  if constexpr (KK == 2) {
    const uint8_t* second = w + (kstep / 4) * kTileRows * 4;
    _tile_loadd(6, second, kTileRows * 4);
    _tile_loadd(7, second + 64, kTileRows * 4);
  }
}

template <bool SIGNED, int KK>
NEO_AMX NEO_INLINE void products(const int8_t* x, int64_t stride, int kstep) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(2, x, stride);
  if constexpr (KK == 2) _tile_loadd(3, x + kstep, stride);
  if constexpr (SIGNED) {
    _tile_dpbssd(0, 2, 4);
    _tile_dpbssd(1, 2, 5);
    if constexpr (KK == 2) {
      _tile_dpbssd(0, 3, 6);
      _tile_dpbssd(1, 3, 7);
    }
  } else {
    _tile_dpbsud(0, 2, 4);
    _tile_dpbsud(1, 2, 5);
    if constexpr (KK == 2) {
      _tile_dpbsud(0, 3, 6);
      _tile_dpbsud(1, 3, 7);
    }
  }
}

// Step s: k-block s / m_tiles, 16 activation rows from m0 + (s % m_tiles) * 16.
template <bool SIGNED, int KK>
NEO_AMX NEO_INLINE void issue(const Problem& p, const GemmActivations& act, const uint8_t* staged, int64_t m0,
                              int64_t m_tiles, int64_t s, int kstep) {
  const int64_t b = s / m_tiles, mt = m0 + s % m_tiles * 16;
  if (s % m_tiles == 0) load_weights<KK>(staged + b * p.block * kTileRows, kstep);
  products<SIGNED, KK>(act.q + mt * act.stride + b * p.block, act.stride, kstep);
}

template <bool SIGNED, int KK>
NEO_AMX void resident_loop(const Problem& p, const GemmActivations& act, const uint8_t* staged, const float* w_scale,
                           int64_t m0, int64_t m1, float* acc) {
  const int kstep = KK == 2 ? 64 : p.block;
  const TileConfig config = resident_config(kstep);
  _tile_loadconfig(&config);
  alignas(64) int32_t c[2][2][256];
  const int64_t blocks = p.blocks(), m_tiles = (m1 - m0 + 15) / 16, steps = blocks * m_tiles;
  issue<SIGNED, KK>(p, act, staged, m0, m_tiles, 0, kstep);
  for (int64_t s = 0; s < steps; ++s) {
    int32_t (&cs)[2][256] = c[s & 1];
    _tile_stored(0, cs[0], 64);
    _tile_stored(1, cs[1], 64);
    if (s + 1 < steps) issue<SIGNED, KK>(p, act, staged, m0, m_tiles, s + 1, kstep);
    const int64_t b = s / m_tiles, mt = m0 + s % m_tiles * 16;
    const float* as = act.scale + mt * act.blocks_pad + b;
    const int rows = static_cast<int>(std::min<int64_t>(16, m1 - mt));
    const bool first = SIGNED && b == 0;
    float* out = acc + (mt - m0) * kTileRows;
    tile_epilogue(cs[0], as, act.blocks_pad, _mm512_loadu_ps(w_scale + b * kTileRows), rows, out, first);
    tile_epilogue(cs[1], as, act.blocks_pad, _mm512_loadu_ps(w_scale + b * kTileRows + 16), rows, out + 16, first);
  }
}

template <bool SIGNED>
NEO_AMX void amx_task(const Job& job, int64_t tile, int64_t chunk) {
  const Problem& p = *job.p;
  const GemmActivations& act = job.act;
  const int64_t n0 = tile * kTileRows, m0 = chunk * kMChunk, m1 = std::min(p.m, m0 + kMChunk);
  const int64_t blocks = p.blocks(), k64 = act.k64;
  thread_local std::vector<uint8_t> staged_buffer;
  thread_local std::vector<float> scale_buffer, acc_buffer;
  if (acc_buffer.size() < static_cast<size_t>(kMChunk * kTileRows)) acc_buffer.resize(kMChunk * kTileRows);
  float* acc = acc_buffer.data();
  if (staged_buffer.size() < static_cast<size_t>(k64 * kTileRows + 64)) staged_buffer.resize(k64 * kTileRows + 64);
  if (scale_buffer.size() < static_cast<size_t>(2 * blocks * kTileRows + 16)) scale_buffer.resize(2 * blocks * kTileRows + 16);
  uint8_t* staged = staged_buffer.data();
  float* w_scale = scale_buffer.data();
  float* zp_scale = SIGNED ? nullptr : w_scale + blocks * kTileRows;
  stage_tile(p, n0, SIGNED, staged, w_scale, zp_scale);
  if (!SIGNED) init_outputs(act, blocks, m0, m1, zp_scale, acc);
  if (p.block <= 128) {
    if (p.block == 128) resident_loop<SIGNED, 2>(p, act, staged, w_scale, m0, m1, acc);
    else resident_loop<SIGNED, 1>(p, act, staged, w_scale, m0, m1, acc);
    _tile_release();
    store_outputs(p, n0, m0, m1, acc);
    return;
  }
  // Blocks of 256: four k-steps per block, too many to keep resident; a 2 x 2 tile block per step.
  const int kstep = std::min(p.block, 64);
  const TileConfig config = tile_config(kstep);
  _tile_loadconfig(&config);
  alignas(64) int32_t c[4][256];
  const int64_t m_tiles_end = m0 + (m1 - m0 + 15) / 16 * 16;  // rows past m1 are zero (padding)
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = staged + b * p.block * kTileRows;
    const __m512 ws0 = _mm512_loadu_ps(w_scale + b * kTileRows), ws1 = _mm512_loadu_ps(w_scale + b * kTileRows + 16);
    const bool first = SIGNED && b == 0;
    for (int64_t mt = m0; mt < m_tiles_end; mt += 32) {
      const bool pair = m_tiles_end - mt >= 32;
      const int8_t* x = act.q + mt * act.stride + b * p.block;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      // All operand loads of a k-step, then its products: tiles are not renamed, so a load into a
      // tile waits for the products still reading it; grouped like this one k-step's products
      // overlap the next one's loads.
      for (int k = 0; k < p.block; k += kstep) {
        _tile_loadd(4, x + k, act.stride);
        if (pair) _tile_loadd(5, x + 16 * act.stride + k, act.stride);
        _tile_loadd(6, w + (k / 4) * kTileRows * 4, kTileRows * 4);
        _tile_loadd(7, w + (k / 4) * kTileRows * 4 + 64, kTileRows * 4);
        if (SIGNED) {
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          if (pair) {
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
        } else {
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          if (pair) {
            _tile_dpbsud(2, 5, 6);
            _tile_dpbsud(3, 5, 7);
          }
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      if (pair) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
      }
      const float* as = act.scale + mt * act.blocks_pad + b;
      float* out = acc + (mt - m0) * kTileRows;
      const int rows0 = static_cast<int>(std::clamp<int64_t>(m1 - mt, 0, 16));
      const int rows1 = static_cast<int>(std::clamp<int64_t>(m1 - mt - 16, 0, 16));
      tile_epilogue(c[0], as, act.blocks_pad, ws0, rows0, out, first);
      tile_epilogue(c[1], as, act.blocks_pad, ws1, rows0, out + 16, first);
      if (pair) {
        tile_epilogue(c[2], as + 16 * act.blocks_pad, act.blocks_pad, ws0, rows1, out + 16 * kTileRows, first);
        tile_epilogue(c[3], as + 16 * act.blocks_pad, act.blocks_pad, ws1, rows1, out + 16 * kTileRows + 16, first);
      }
    }
  }
  // Leaves no tile state behind: the next op on this thread pays no AMX save/restore.
  _tile_release();
  store_outputs(p, n0, m0, m1, acc);
}

void task(void* user, size_t index) {
  const Job& job = *static_cast<const Job*>(user);
  const int64_t tile = static_cast<int64_t>(index) / job.m_chunks, chunk = static_cast<int64_t>(index) % job.m_chunks;
  if (job.p->bits == 4) amx_task<true>(job, tile, chunk);
  else amx_task<false>(job, tile, chunk);
}

}  // namespace

bool amx_gemm(const Problem& p, const Parallel& parallel, const GemmActivations& act) {
  const int64_t n_tiles = (p.n + kTileRows - 1) / kTileRows, m_chunks = (p.m + kMChunk - 1) / kMChunk;
  Job job{&p, act, n_tiles, m_chunks};
  return parallel(task, static_cast<size_t>(n_tiles * m_chunks), &job);
}

}  // namespace x86
}  // namespace neoedge

#endif
