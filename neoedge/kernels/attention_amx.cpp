// Prompt attention on AMX-BF16 tiles (semantics in attention.h), for head sizes 64 and 128.
//
// Why tiles: the AVX-512 path spends ~10-20 cycles on each (query, key) pair of a prompt (a row dot
// product reduced across lanes, then the value FMAs), which made attention 38% of a 1,024-token
// 125M prefill. Here both products are tile products, flash attention's order over blocks of 32
// keys: scores for two 16-query tiles, the online softmax in vectors, probabilities times values.
// Scores are computed transposed (keys x queries) so that the softmax keeps one query per lane
// and needs no reductions across lanes.
//
// Why bfloat16 in three parts: the cached keys and values are int8, exact in bfloat16, but the
// scaled queries and the probabilities are fp32. Each is split into three bfloat16 parts (each the
// truncated top half of what the parts before it left), which together carry 24 significant bits,
// fp32's precision; the tile unit multiplies the parts exactly and accumulates in fp32. (Int8 tiles
// would need an int32 accumulator tile per part, and there are too few tiles for that.)
//
// Measured here (Xeon with AMX, one TDPBF16PS ~17 ns): the tile products take about a third of
// the time, the softmax and the conversion of each key block the rest; a block is converted once
// for a task's 128 queries.
#include "attention.h"
#include "x86.h"
#include "avx512_exp.h"

#if NEO_X86

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#define NEO_AMX_BF16                                                                                       \
  NEO_TARGET("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile," \
             "amx-bf16")

namespace neoedge {

namespace {

constexpr int kRows = 16;         // queries per tile; tiles go in pairs (32 queries)
constexpr int kKeys = 32;         // keys per block: two 16-key tiles
constexpr int kParts = 3;         // bfloat16 parts of an fp32 operand
constexpr int kMaxKSteps = 4;     // head size / 32, at most (head size 128)
constexpr int kTileHalves = 512;  // bfloat16 values in a 16 x 64-byte tile
constexpr int kQueryTiles = 8;    // a task's queries: up to 128, so that each block is staged once for them

// Every tile is 16 rows of 64 bytes: C tiles 16 x 16 fp32, A and B tiles 16 x 32 bfloat16.
x86::TileConfig tile_config() {
  x86::TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  return c;
}

// One thread's scratch: tile operands in the layouts the tile loads read, and the queries' softmax
// state with the queries in vector lanes (scores are computed transposed, keys x queries, so that
// a query's maximum and sum need no reduction across lanes).
//
// Pairs: a bfloat16 tile product multiplies pairs of values. Channel pairs are (c, c + 16) of a
// 32-channel k-step, key pairs (r, r + 16) of a 32-key block: both halves come from two vectors by
// one blend, with no shuffles.
struct alignas(64) Scratch {
  // B tiles of the scaled queries: [query tile][part][k-step][16 channel pairs x 16 queries x 2].
  uint16_t q[kQueryTiles][kParts][kMaxKSteps][kTileHalves];
  // A tiles of the block's keys: [key tile][k-step][16 keys x 16 channel pairs x 2].
  uint16_t k[2][kMaxKSteps][kTileHalves];
  // A tiles of the block's values, transposed: [channel tile][16 channels x 16 key pairs x 2].
  uint16_t v[2 * kMaxKSteps][kTileHalves];
  // B tiles of the probabilities: [query tile of the pair][part][16 key pairs x 16 queries x 2].
  uint16_t p[2][kParts][kTileHalves];
  float scores[2][kKeys][kRows];    // [query tile of the pair][key][query]
  float products[4][kRows * kRows];           // C tiles of a channel pass
  float out[kQueryTiles][32 * kMaxKSteps][kRows];  // [query tile][channel][query], unnormalised
  alignas(64) float max[kQueryTiles][kRows];
  alignas(64) float sum[kQueryTiles][kRows];
  alignas(64) float rescale[kQueryTiles][kRows];
  alignas(64) int32_t first[kQueryTiles][kRows];  // each query's first visible key
  alignas(64) int32_t span[kQueryTiles][kRows];   // and how many it sees (0: none, or padding)
};

NEO_AMX_BF16 NEO_INLINE __m512i bits(__m512 x) { return _mm512_castps_si512(x); }

// Two vectors as one row of bfloat16 pairs: dword n = (a[n], b[n]), each truncated to its top half.
NEO_AMX_BF16 NEO_INLINE __m512i pair(__m512 a, __m512 b) {
  return _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(bits(a), 16), bits(b));
}

NEO_AMX_BF16 NEO_INLINE __m512 top_half(__m512 x) {
  return _mm512_castsi512_ps(_mm512_and_si512(bits(x), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// (a, b) as three rows of bfloat16 pairs whose sums are a and b to 24 significant bits: each part is
// the truncated top half of what the parts before it left (exact fp32 subtractions).
NEO_AMX_BF16 NEO_INLINE void split_pair(__m512 a, __m512 b, __m512i (&parts)[kParts]) {
  for (int part = 0; part < kParts; ++part) {
    parts[part] = pair(a, b);
    if (part + 1 < kParts) a = _mm512_sub_ps(a, top_half(a)), b = _mm512_sub_ps(b, top_half(b));
  }
}

// 16 int8 as fp32 (exact, and so are their bfloat16 top halves).
NEO_AMX_BF16 NEO_INLINE __m512 widen(const int8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}

// Rows as columns: r[e] lane n = old r[n] lane e, for 16 x 16 32-bit elements.
NEO_AMX_BF16 NEO_INLINE void transpose(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[g][c]: per 128-bit lane L, element 4L + c of rows 4g .. 4g + 3.
  __m512i u[4][4];
  for (int g = 0; g < 4; ++g) {
    u[g][0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[g][1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[g][2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[g][3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0x44), v1 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0x44), v3 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// The task's queries [i0, i1) scaled by the key scales, transposed into B tiles (padding queries
// are zeros), and each query's visible keys.
template <int KS>
NEO_AMX_BF16 void stage_queries(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, Scratch& s) {
  const float* ks = p.k_scale + h * p.head_size;
  const int tiles = static_cast<int>((i1 - i0 + 2 * kRows - 1) / (2 * kRows)) * 2;
  for (int t = 0; t < tiles; ++t) {
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + t * kRows + r;
      int64_t first = 0, last = -1;
      if (i < i1) p.key_range(b, i, &first, &last);
      s.first[t][r] = static_cast<int32_t>(first);
      s.span[t][r] = last >= first ? static_cast<int32_t>(last - first + 1) : 0;
    }
    for (int step = 0; step < KS; ++step) {
      __m512i rows[kParts][16];
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + t * kRows + r;
        __m512 a = _mm512_setzero_ps(), c = _mm512_setzero_ps();
        if (i < i1) {
          const float* q = p.query(b, i, h) + 32 * step;
          a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(ks + 32 * step));
          c = _mm512_mul_ps(_mm512_loadu_ps(q + 16), _mm512_loadu_ps(ks + 32 * step + 16));
        }
        __m512i parts[kParts];
        split_pair(a, c, parts);
        for (int part = 0; part < kParts; ++part) rows[part][r] = parts[part];
      }
      for (int part = 0; part < kParts; ++part) {
        transpose(rows[part]);
        for (int r = 0; r < 16; ++r) _mm512_store_si512(s.q[t][part][step] + r * 32, rows[part][r]);
      }
    }
  }
}

// Keys [j0, j0 + count) as A tiles, and their values transposed. Keys past count are zeros, in
// both (a stale value times a zero probability could be NaN x 0).
template <int KS>
NEO_AMX_BF16 void stage_block(const AttentionProblem& p, int64_t b, int64_t h, int64_t j0, int count, Scratch& s) {
  const __m512 zero = _mm512_setzero_ps();
  for (int kt = 0; kt < 2; ++kt) {
    for (int r = 0; r < 16; ++r) {
      const int key = 16 * kt + r;
      const int8_t* row = key < count ? p.key_row(b, h, j0 + key) : nullptr;
      for (int step = 0; step < KS; ++step) {
        const __m512i x = row ? pair(widen(row + 32 * step), widen(row + 32 * step + 16)) : _mm512_setzero_si512();
        _mm512_store_si512(s.k[kt][step] + r * 32, x);
      }
    }
  }
  for (int ct = 0; ct < 2 * KS; ++ct) {
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) {
      const __m512 a = r < count ? widen(p.value_row(b, h, j0 + r) + 16 * ct) : zero;
      const __m512 c = r + 16 < count ? widen(p.value_row(b, h, j0 + r + 16) + 16 * ct) : zero;
      rows[r] = pair(a, c);
    }
    transpose(rows);
    for (int r = 0; r < 16; ++r) _mm512_store_si512(s.v[ct] + r * 32, rows[r]);
  }
}

// C tiles: 0 = (key tile 0, query tile 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1); four independent
// accumulators, so that consecutive products do not wait on each other, and every operand load is
// two products behind the last reader of its tile.
template <int KS>
NEO_AMX_BF16 void score_tiles(Scratch& s, int pair) {
  const int t0 = 2 * pair, t1 = 2 * pair + 1;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int step = 0; step < KS; ++step) {
    for (int part = 0; part < kParts; ++part) {
      _tile_loadd(4, s.k[0][step], 64);
      _tile_loadd(6, s.q[t0][part][step], 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, s.q[t1][part][step], 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, s.k[1][step], 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, s.scores[0][0], 64);
  _tile_stored(1, s.scores[1][0], 64);
  _tile_stored(2, s.scores[0][16], 64);
  _tile_stored(3, s.scores[1][16], 64);
}

// Outputs of channel tiles ct and ct + 1 for both query tiles: C = (ct, q0), (ct, q1), (ct + 1, q0),
// (ct + 1, q1), each [16 channels][16 queries].
NEO_AMX_BF16 void value_tiles(Scratch& s, int ct) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int part = 0; part < kParts; ++part) {
    _tile_loadd(4, s.v[ct], 64);
    _tile_loadd(6, s.p[0][part], 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, s.p[1][part], 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, s.v[ct + 1], 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, s.products[0], 64);
  _tile_stored(1, s.products[1], 64);
  _tile_stored(2, s.products[2], 64);
  _tile_stored(3, s.products[3], 64);
}

// exp(score - max) for the valid lanes, zero below exp(-70) (4e-31, against the maximum's 1): the
// parts of smaller values can be denormal (the third part of p is as small as p x 2^-23), and each
// vector operation on a denormal takes a microcode assist. GPT-Neo's unscaled scores spread over
// hundreds, so this is the common case; on random test data it made the whole attention 1.8x
// slower. Dropping against the running maximum is safe: the final one is only larger.
NEO_AMX_BF16 NEO_INLINE __m512 probability(__m512 score, __m512 max, __mmask16 valid) {
  const __m512 x = _mm512_sub_ps(score, max);
  const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(-70.f), _CMP_GT_OQ);
  return _mm512_maskz_mov_ps(keep, x86::exp_clamped(x));
}

// The online softmax's step for query tile t over keys [j0, j0 + count): probabilities as B tiles,
// the running maximum and sum, and the factor the output so far is rescaled by; lanes are queries.
NEO_AMX_BF16 void softmax_step(int64_t j0, int count, Scratch& s, int t) {
  const int slot = t % 2;  // the tile's place in its pair's scores and probabilities
  const __m512i first = _mm512_load_si512(s.first[t]), span = _mm512_load_si512(s.span[t]);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 valid[kKeys];
  __m512 top = minus_inf;
  for (int r = 0; r < count; ++r) {
    // key - first in [0, span): below zero reads as a large unsigned value
    valid[r] = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(j0 + r)), first), span);
    top = _mm512_mask_max_ps(top, valid[r], top, _mm512_load_ps(s.scores[slot][r]));
  }
  for (int r = count; r < kKeys; ++r) valid[r] = 0;
  const __m512 old_max = _mm512_load_ps(s.max[t]);
  const __m512 max = _mm512_max_ps(old_max, top);
  // Queries without a key yet keep factor 1 (and no -inf - -inf); from the first key on, the
  // running output and sum were relative to the old maximum (exp of -inf clamps to ~1e-38 x 0).
  const __mmask16 seen = _mm512_cmp_ps_mask(max, minus_inf, _CMP_NEQ_OQ);
  const __m512 factor = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), seen, x86::exp_clamped(_mm512_sub_ps(old_max, max)));
  _mm512_store_ps(s.rescale[t], factor);
  _mm512_store_ps(s.max[t], max);
  __m512 total = _mm512_mul_ps(_mm512_load_ps(s.sum[t]), factor);
  for (int r = 0; r < 16; ++r) {
    const __m512 a = probability(_mm512_load_ps(s.scores[slot][r]), max, valid[r]);
    const __m512 c = probability(_mm512_load_ps(s.scores[slot][r + 16]), max, valid[r + 16]);
    total = _mm512_add_ps(total, _mm512_add_ps(a, c));
    __m512i parts[kParts];
    split_pair(a, c, parts);
    for (int part = 0; part < kParts; ++part) _mm512_store_si512(s.p[slot][part] + r * 32, parts[part]);
  }
  _mm512_store_ps(s.sum[t], total);
}

template <int KS>
NEO_AMX_BF16 void attend_tiles(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, Scratch& s) {
  constexpr int D = 32 * KS;
  stage_queries<KS>(p, b, h, i0, i1, s);
  // Whole pairs: a pair's second tile may be all padding.
  const int tiles = static_cast<int>((i1 - i0 + 2 * kRows - 1) / (2 * kRows)) * 2;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  int64_t pair_lo[kQueryTiles / 2], pair_hi[kQueryTiles / 2];
  for (int t = 0; t < tiles; ++t) {
    if (t % 2 == 0) pair_lo[t / 2] = std::numeric_limits<int64_t>::max(), pair_hi[t / 2] = -1;
    for (int r = 0; r < kRows; ++r) {
      if (s.span[t][r] == 0) continue;
      pair_lo[t / 2] = std::min<int64_t>(pair_lo[t / 2], s.first[t][r]);
      pair_hi[t / 2] = std::max<int64_t>(pair_hi[t / 2], s.first[t][r] + s.span[t][r] - 1);
    }
    lo = std::min(lo, pair_lo[t / 2]);
    hi = std::max(hi, pair_hi[t / 2]);
    std::fill(&s.out[t][0][0], &s.out[t][0][0] + D * kRows, 0.f);
    std::fill(s.max[t], s.max[t] + kRows, -std::numeric_limits<float>::infinity());
    std::fill(s.sum[t], s.sum[t] + kRows, 0.f);
  }
  const int pairs = (tiles + 1) / 2;
  for (int64_t j0 = lo; j0 <= hi; j0 += kKeys) {
    const int count = static_cast<int>(std::min<int64_t>(kKeys, hi - j0 + 1));
    stage_block<KS>(p, b, h, j0, count, s);
    for (int pair = 0; pair < pairs; ++pair) {
      if (pair_lo[pair] > j0 + count - 1 || pair_hi[pair] < j0) continue;
      score_tiles<KS>(s, pair);
      softmax_step(j0, count, s, 2 * pair);
      softmax_step(j0, count, s, 2 * pair + 1);
      for (int ct = 0; ct < 2 * KS; ct += 2) {
        value_tiles(s, ct);
        for (int c = 0; c < 2; ++c) {
          for (int slot = 0; slot < 2; ++slot) {
            const int t = 2 * pair + slot;
            const __m512 f = _mm512_load_ps(s.rescale[t]);
            const float* product = s.products[2 * c + slot];
            float* o = s.out[t][16 * (ct + c)];
            for (int r = 0; r < 16; ++r)
              _mm512_store_ps(o + 16 * r, _mm512_fmadd_ps(_mm512_load_ps(o + 16 * r), f, _mm512_load_ps(product + 16 * r)));
          }
        }
      }
    }
  }
  // out = O / sum * v_scale, back to [query][channel]; zeros for a query without keys.
  const float* vs = p.v_scale + h * D;
  for (int t = 0; t < tiles; ++t) {
    alignas(64) float inverse[kRows];
    for (int r = 0; r < kRows; ++r) inverse[r] = s.sum[t][r] > 0.f ? 1.f / s.sum[t][r] : 0.f;
    for (int ct = 0; ct < D / 16; ++ct) {
      __m512i rows[16];
      for (int c = 0; c < 16; ++c) rows[c] = _mm512_load_si512(s.out[t][16 * ct + c]);
      transpose(rows);
      const __m512 scale = _mm512_loadu_ps(vs + 16 * ct);
      for (int r = 0; r < kRows && i0 + t * kRows + r < i1; ++r) {
        float* out = p.out + (b * p.seq + i0 + t * kRows + r) * p.heads * D + h * D + 16 * ct;
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(rows[r]), _mm512_set1_ps(inverse[r])), scale));
      }
    }
  }
}

NEO_AMX_BF16 void attend_on_tiles(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1,
                                  Scratch& scratch) {
  const x86::TileConfig config = tile_config();
  _tile_loadconfig(&config);
  if (p.head_size == 64) attend_tiles<2>(p, b, h, i0, i1, scratch);
  else attend_tiles<4>(p, b, h, i0, i1, scratch);
  // Leaves no tile state behind: the next op on this thread pays no AMX save/restore.
  _tile_release();
}

}  // namespace

bool attend_amx_applies(const AttentionProblem& p, int64_t queries) {
  return (p.head_size == 64 || p.head_size == 128) && queries >= 4 && queries <= kQueryTiles * kRows;
}

void attend_amx(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  thread_local std::unique_ptr<Scratch> scratch;
  if (!scratch) scratch.reset(new Scratch);
  attend_on_tiles(p, b, h, i0, i1, *scratch);
}

}  // namespace neoedge

#endif
