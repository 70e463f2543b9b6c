// AVX-512 VNNI batched decode: M = 4..16 activation rows (a batch of sequences, one token each).
//
// The one-row GEMV (avx512.cpp) keeps k in the vector lanes, so every (activation row, weight row)
// pair needs its own block epilogue and a final horizontal sum: at M = 8 that epilogue, not the
// weight stream, set the pace (a step cost 4-5x a one-row step). Here the lanes hold 16 weight
// rows instead. Per k-unit (128 k of 4-bit weights, 64 of 8-bit: 64 packed bytes a row), the 16
// rows' bytes are transposed in registers into VNNI order (for each 4 k, the 4 bytes of every row
// side by side), 4-bit values split into their low and high nibbles, and kept in L1 while every
// activation row multiplies them: one vpdpbusd per 4 k per row, the activation's 4 bytes
// broadcast. A block's scales and zero points then apply to 16 outputs per instruction.
//
// Nibble order: a packed byte holds k = 2i (low nibble) and 2i + 1 (high). A dword of 4 bytes thus
// holds k 8j..8j+7; its low nibbles are the even k and its high nibbles the odd k. The activations
// are stored to match: per 8 k, the 4 even k, then the 4 odd k.
//
// Weights stay where onnxruntime loaded them; each weight byte is read from memory once per call.
#include "avx512_blocks.h"

#if NEO_X86

#include <algorithm>
#include <cstring>
#include <vector>

namespace neoedge {
namespace x86 {

namespace {

constexpr int kLanes = 16;     // weight rows per tile: the dword lanes of a zmm
constexpr int kMaxRows = 8;    // activation rows per pass over a staged block (sums in registers)
constexpr int kMaxStaged = 64;  // staged vectors of a block of 256 (2 units at 4 bits, 4 at 8)

template <int BITS>
constexpr int unit_k() { return BITS == 4 ? 128 : 64; }
// Staged vectors per unit: 16 dwords of a row, split into low and high nibbles at 4 bits.
template <int BITS>
constexpr int unit_vectors() { return BITS == 4 ? 32 : 16; }

struct BatchJob {
  const Problem* p;
  RowActivations act;
  int64_t tiles_per_task;
  bool amx;
};

// Unit u of 16 weight rows starting at `rows`, in VNNI order into staged[0, unit_vectors).
template <int BITS>
NEO_AVX512 NEO_INLINE void stage_unit(const uint8_t* rows, int64_t row_bytes, int valid, int64_t u, __m512i* staged) {
  __m512i r[16];
  const uint8_t* src = rows + u * 64;
  for (int i = 0; i < kLanes; ++i) {
    if (i < valid) {
      // The next tile's rows follow these 16: fetch the same unit there, ahead of the stream.
      _mm_prefetch(reinterpret_cast<const char*>(src + (i + kLanes) * row_bytes), _MM_HINT_T0);
      r[i] = _mm512_loadu_si512(src + i * row_bytes);
    } else {
      r[i] = _mm512_setzero_si512();
    }
  }
  transpose16(r);
  if (BITS == 4) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 16; ++j) {
      _mm512_store_si512(staged + 2 * j, _mm512_and_si512(r[j], low));
      _mm512_store_si512(staged + 2 * j + 1, _mm512_and_si512(_mm512_srli_epi16(r[j], 4), low));
    }
  } else {
    for (int j = 0; j < 16; ++j) _mm512_store_si512(staged + j, r[j]);
  }
}

// One activation row's block epilogue, for both the vector and the tile path (the same bits from
// the same exact int32 sums): out += w_scale * a_scale * sum - zpw * scaled_sum.
NEO_AVX512 NEO_INLINE void add_block(float* out, __m512i sum, float a_scale, float scaled_sum, __m512 w_scale,
                                     __m512 zpw) {
  const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a_scale));
  const __m512 y = _mm512_fmadd_ps(t, w_scale, _mm512_load_ps(out));
  _mm512_store_ps(out, _mm512_fnmadd_ps(zpw, _mm512_set1_ps(scaled_sum), y));
}

// MR activation rows against one staged block (add_block for each).
// One named accumulator per row: with an array of them GCC 12 put two register copies around every
// vpdpbusd (objdump: 17 vmovdqa per 8 products), or with the asm form kept the array on the stack.
template <int MR>
NEO_AVX512 void block_rows(const __m512i* staged, int vectors, const int8_t* q, int64_t k, const float* a_scale,
                           const float* scaled_sum, int64_t blocks, __m512 w_scale, __m512 zpw, float* acc) {
  static_assert(MR >= 1 && MR <= kMaxRows, "rows per pass");
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
  for (int v = 0; v < vectors; ++v) {
    const __m512i w = _mm512_load_si512(staged + v);
    const int8_t* x = q + v * 4;
#define NEO_ROW(i) \
    if constexpr (MR > i) dpbusd(s##i, w, broadcast4(x + i * k));
    NEO_ROW(0) NEO_ROW(1) NEO_ROW(2) NEO_ROW(3) NEO_ROW(4) NEO_ROW(5) NEO_ROW(6) NEO_ROW(7)
#undef NEO_ROW
  }
  const __m512i sums[kMaxRows] = {s0, s1, s2, s3, s4, s5, s6, s7};
  for (int m = 0; m < MR; ++m)
    add_block(acc + m * kLanes, sums[m], a_scale[m * blocks], scaled_sum[m * blocks], w_scale, zpw);
}

NEO_AVX512 void block_all_rows(const Problem& p, const RowActivations& act, const __m512i* staged, int vectors,
                               int64_t b, __m512 w_scale, __m512 zpw, float* acc) {
  const int64_t blocks = p.blocks();
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxRows) {
    const int8_t* q = act.q + m0 * p.k + b * p.block;
    const float* as = act.scale + m0 * blocks + b;
    const float* ss = act.scaled_sum + m0 * blocks + b;
    float* out = acc + m0 * kLanes;
    switch (std::min<int64_t>(kMaxRows, p.m - m0)) {
      case 1: block_rows<1>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 2: block_rows<2>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 3: block_rows<3>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 4: block_rows<4>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 5: block_rows<5>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 6: block_rows<6>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      case 7: block_rows<7>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
      default: block_rows<8>(staged, vectors, q, p.k, as, ss, blocks, w_scale, zpw, out); break;
    }
  }
}

// Block b's scales for the 16 weight rows from n0 (`valid` of them), and zero point x scale.
struct BlockScales {
  __m512 w_scale, zpw;
};

// The scales of the 16 weight rows from n0 for every block, as [blocks][16] (zero past `valid`),
// transposed 16 blocks at a time. A gather of each block's 16 scales (a row's blocks apart) was 40%
// of batch_tile's samples at batch 8 on Zen 5; batch_tile and this together now take less (perf).
NEO_AVX512 float* tile_scales(const Problem& p, int64_t n0, int valid) {
  thread_local std::vector<float> buffer;
  const int64_t blocks = p.blocks();
  float* out = grow(buffer, static_cast<size_t>(round_up(blocks, 16) * kLanes));
  for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
    const int64_t count = std::min<int64_t>(16, blocks - b0);
    const __mmask16 mask = static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1);
    __m512i r[16];
    for (int i = 0; i < kLanes; ++i)
      r[i] = i < valid ? _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, p.scales + (n0 + i) * blocks + b0))
                       : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t j = 0; j < count; ++j) _mm512_storeu_si512(out + (b0 + j) * kLanes, r[j]);
  }
  return out;
}

// Block b's scales for the 16 weight rows from n0 (`valid` of them; `w_scales` from tile_scales),
// and zero point x scale.
template <int BITS>
NEO_AVX512 NEO_INLINE BlockScales block_scales(const Problem& p, const float* w_scales, int64_t n0, int64_t b,
                                               int valid) {
  const __m512 w_scale = _mm512_loadu_ps(w_scales + b * kLanes);
  if (!p.zp) return {w_scale, _mm512_mul_ps(w_scale, _mm512_set1_ps(static_cast<float>(1 << (BITS - 1))))};
  alignas(64) float zp[kLanes] = {};
  for (int i = 0; i < valid; ++i) zp[i] = static_cast<float>(p.zero_point(n0 + i, b));
  return {w_scale, _mm512_mul_ps(w_scale, _mm512_load_ps(zp))};
}

NEO_AVX512 NEO_INLINE void store_rows(const Problem& p, int64_t n0, __mmask16 lanes, const float* acc) {
  for (int64_t m = 0; m < p.m; ++m) store_lanes(p.y + m * p.n + n0, lanes, _mm512_load_ps(acc + m * kLanes));
}

template <int BITS>
NEO_AVX512 void batch_tile(const Problem& p, const RowActivations& act, int64_t n0) {
  constexpr int per_unit = unit_vectors<BITS>();
  const int64_t blocks = p.blocks(), row_bytes = p.row_bytes(), units = p.block / unit_k<BITS>();
  const int valid = static_cast<int>(std::min<int64_t>(kLanes, p.n - n0));
  const __mmask16 lanes = static_cast<__mmask16>(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
  alignas(64) __m512i staged[kMaxStaged];
  alignas(64) float acc[kMaxBatchRows * kLanes];
  for (int64_t m = 0; m < p.m; ++m) _mm512_store_ps(acc + m * kLanes, _mm512_setzero_ps());
  const uint8_t* rows = p.b + n0 * row_bytes;
  const float* w_scales = tile_scales(p, n0, valid);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t u = 0; u < units; ++u) stage_unit<BITS>(rows, row_bytes, valid, b * units + u, staged + u * per_unit);
    const BlockScales scales = block_scales<BITS>(p, w_scales, n0, b, valid);
    block_all_rows(p, act, staged, static_cast<int>(units * per_unit), b, scales.w_scale, scales.zpw, acc);
  }
  store_rows(p, n0, lanes, acc);
}

// The same tile on AMX: the staged block is already a B tile's layout (16 rows of 4 k, each row
// the 4 bytes of every weight row) and the activations are an A tile of M rows, so one TDPBSUD per
// 64 k does the M x 16 products that take the vector path 16 x M vpdpbusd. Why: at batch 8 those
// vpdpbusd were most of a decode step's linear-layer time (one per cycle, on one port).
// tmm0, tmm1: C (M rows of 16 int32, alternating blocks); tmm2: A (M rows of 64 activation bytes);
// tmm3: B (16 rows of 64 staged bytes).
TileConfig batch_tile_config(int64_t m) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[1] = c.rows[2] = static_cast<uint8_t>(m);
  c.rows[3] = 16;
  return c;
}

// One block's M x 16 int32 sums in C tile `C`, stored to `out`. A macro: the tile intrinsics take
// their tile numbers as literals (they are spelled into the instruction's text).
#define NEO_BLOCK_PRODUCTS(C, x, stride, staged, steps, out) \
  do {                                                       \
    _tile_zero(C);                                           \
    for (int s_ = 0; s_ < (steps); ++s_) {                   \
      _tile_loadd(2, (x) + 64 * s_, (stride));               \
      _tile_loadd(3, (staged) + 16 * s_, 64);                \
      _tile_dpbsud(C, 2, 3);                                 \
    }                                                        \
    _tile_stored(C, (out), 64);                              \
  } while (0)

template <int BITS>
NEO_AMX void batch_tile_amx(const Problem& p, const RowActivations& act, int64_t n0) {
  constexpr int per_unit = unit_vectors<BITS>();
  const int64_t blocks = p.blocks(), row_bytes = p.row_bytes(), units = p.block / unit_k<BITS>();
  const int steps = static_cast<int>(units * per_unit / 16);  // k-steps of 64 bytes per block
  const int valid = static_cast<int>(std::min<int64_t>(kLanes, p.n - n0));
  const __mmask16 lanes = static_cast<__mmask16>(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
  alignas(64) __m512i staged[2][kMaxStaged];
  alignas(64) int32_t c[2][kMaxBatchRows * kLanes];
  alignas(64) float acc[kMaxBatchRows * kLanes];
  BlockScales scales[2];
  for (int64_t m = 0; m < p.m; ++m) _mm512_store_ps(acc + m * kLanes, _mm512_setzero_ps());
  const uint8_t* rows = p.b + n0 * row_bytes;
  const float* w_scales = tile_scales(p, n0, valid);
  // Block b's epilogue runs after block b + 1's products are issued: vector loads of a tile just
  // stored wait for the store, and the tile unit would idle meanwhile.
  auto epilogue = [&](int64_t b) NEO_AMX {
    for (int64_t m = 0; m < p.m; ++m)
      add_block(acc + m * kLanes, _mm512_load_si512(c[b & 1] + m * kLanes), act.scale[m * blocks + b],
                act.scaled_sum[m * blocks + b], scales[b & 1].w_scale, scales[b & 1].zpw);
  };
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i* st = staged[b & 1];
    for (int64_t u = 0; u < units; ++u) stage_unit<BITS>(rows, row_bytes, valid, b * units + u, st + u * per_unit);
    scales[b & 1] = block_scales<BITS>(p, w_scales, n0, b, valid);
    const int8_t* x = act.q + b * p.block;
    if (b & 1) NEO_BLOCK_PRODUCTS(1, x, p.k, st, steps, c[1]);
    else NEO_BLOCK_PRODUCTS(0, x, p.k, st, steps, c[0]);
    if (b > 0) epilogue(b - 1);
  }
  epilogue(blocks - 1);
  store_rows(p, n0, lanes, acc);
}

#undef NEO_BLOCK_PRODUCTS

NEO_AMX void batch_tiles_amx(const BatchJob& job, int64_t t0, int64_t t1) {
  const Problem& p = *job.p;
  const TileConfig config = batch_tile_config(p.m);
  _tile_loadconfig(&config);
  for (int64_t t = t0; t < t1; ++t) {
    if (p.bits == 4) batch_tile_amx<4>(p, job.act, t * kLanes);
    else batch_tile_amx<8>(p, job.act, t * kLanes);
  }
  _tile_release();
}

void batch_task(void* user, size_t task) {
  const BatchJob& job = *static_cast<const BatchJob*>(user);
  const Problem& p = *job.p;
  const int64_t tiles = (p.n + kLanes - 1) / kLanes;
  const int64_t t0 = static_cast<int64_t>(task) * job.tiles_per_task;
  const int64_t t1 = std::min<int64_t>(tiles, t0 + job.tiles_per_task);
  if (job.amx) {
    batch_tiles_amx(job, t0, t1);
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    if (p.bits == 4) batch_tile<4>(p, job.act, t * kLanes);
    else batch_tile<8>(p, job.act, t * kLanes);
  }
}

}  // namespace

bool batch_gemv_applies(const Problem& p) {
  // A block must hold whole units (the scales apply per block), and the accumulators of every
  // activation row live on the task's stack.
  return p.m <= kMaxBatchRows && p.block % (p.bits == 4 ? 128 : 64) == 0 && p.block <= 256;
}

NEO_AVX512 RowActivations quantize_rows(const Problem& p) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;
  const int64_t blocks = p.blocks();
  int8_t* qd = grow(q, static_cast<size_t>(p.m * p.k));
  float* sd = grow(scales, static_cast<size_t>(2 * p.m * blocks));
  for (int64_t m = 0; m < p.m; ++m) {
    int8_t* row = qd + m * p.k;
    for (int64_t b = 0; b < blocks; ++b) {
      const QuantizedBlock r = quantize_block_avx512(p.a + m * p.k + b * p.block, p.block, row + b * p.block);
      sd[m * blocks + b] = r.scale;
      sd[(p.m + m) * blocks + b] = r.scale * static_cast<float>(r.sum);
    }
    if (p.bits == 4) split_even_odd(row, p.k);
  }
  return {qd, sd, sd + p.m * blocks};
}

NEO_AVX512 bool batch_gemv(const Problem& p, const Parallel& parallel, bool amx) {
  const RowActivations act = quantize_rows(p);
  // Tasks of ~32 KB of weights, as the one-row GEMV's.
  const int64_t tiles = (p.n + kLanes - 1) / kLanes;
  const int64_t per_task = std::max<int64_t>(1, 32768 / (kLanes * p.row_bytes()));
  BatchJob job{&p, act, per_task, amx};
  return parallel(batch_task, static_cast<size_t>((tiles + per_task - 1) / per_task), &job);
}

}  // namespace x86
}  // namespace neoedge

#endif
