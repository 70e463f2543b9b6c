// AVX-512 attention over the int8 cache (semantics in attention.h). Three forms, by the task's
// queries (one row, one head):
//
// - 12 or more (prompt chunks): attend_blocked, queries in lanes, both products register-blocked
//   over fp32 tiles of the keys and values (see there).
// - 4 to 11: attend_tiled. The keys and values the task's queries see are converted to fp32 a tile
//   at a time and shared by the queries. Each query runs an online softmax over blocks of 64 keys,
//   its scaled query and its output accumulators held in registers: per 16 keys, 16 row dot
//   products reduced to one vector of scores; the block's maximum and exp in vector form; the
//   running output rescaled only when the maximum moves.
// - 1 to 3 (a decode step): attend_direct, the same softmax over rows read straight from the int8
//   cache, the scores in integers.
//
// The value scales are applied once at the end (they are per channel, constant over keys); the key
// scales are folded into the query.
#include "attention.h"
#include "x86.h"
#include "avx512_exp.h"

#if NEO_X86

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace neoedge {

namespace {

// 16 vectors of partial sums -> one vector: lane j is the total of v[j].
NEO_AVX512 NEO_INLINE __m512 reduce16(const __m512 (&v)[16]) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // y[i]'s 128-bit lane L holds the sums over lane L of v[4i .. 4i + 3].
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}


// Rows [first, first + count) of the cache as fp32, ND vectors of 16 per row.
template <int ND>
NEO_AVX512 NEO_INLINE void to_float(const int8_t* rows, int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j)
    for (int c = 0; c < ND; ++c)
      _mm512_storeu_ps(out + (j * ND + c) * 16,
                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                           reinterpret_cast<const __m128i*>(rows + (j * ND + c) * 16)))));
}

// Channels [16c, 16c + 16) of cached row j as fp32: from the task's converted copy, or (a lone query,
// which would read each row once) straight from the int8 cache.
template <bool CONVERTED>
NEO_AVX512 NEO_INLINE __m512 row_chunk(const float* converted, const int8_t* cached, int64_t j, int d, int c) {
  if (CONVERTED) return _mm512_loadu_ps(converted + j * d + c * 16);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cached + j * d + c * 16))));
}

// Keys per online-softmax step (see key_block).
constexpr int kBlockKeys = 64;

// Scores of one block: s[g] holds keys [16g, 16g + 16) of the block (-inf past its count), valid[g]
// their mask.
struct BlockScores {
  __m512 s[kBlockKeys / 16];
  __mmask16 valid[kBlockKeys / 16];
  int groups;
};

NEO_AVX512 NEO_INLINE __m512 finish_group(BlockScores& b, int g, int count, const __m512 (&dots)[16], __m512 factor,
                                          __m512 block_max) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  b.valid[g] = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(count - g * 16));
  b.s[g] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), b.valid[g],
                              _mm512_mul_ps(reduce16(dots), factor));
  return _mm512_max_ps(block_max, b.s[g]);
}

// The block's scores by fp32 products; returns their maximum.
template <int ND, bool CONVERTED>
NEO_AVX512 NEO_INLINE float fp32_scores(const __m512 (&qs)[ND], const float* kb, const int8_t* kq, int count,
                                        BlockScores& b) {
  constexpr int D = ND * 16;
  b.groups = (count + 15) / 16;
  __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int g = 0; g < b.groups; ++g) {
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) {
      const int row = g * 16 + j;
      if (!CONVERTED && row >= count) {  // the cache may end here: no reads past the block
        dots[j] = _mm512_setzero_ps();
        continue;
      }
      __m512 acc = _mm512_mul_ps(qs[0], row_chunk<CONVERTED>(kb, kq, row, D, 0));
      for (int c = 1; c < ND; ++c) acc = _mm512_fmadd_ps(qs[c], row_chunk<CONVERTED>(kb, kq, row, D, c), acc);
      dots[j] = acc;
    }
    block_max = finish_group(b, g, count, dots, _mm512_set1_ps(1.f), block_max);
  }
  return _mm512_reduce_max_ps(block_max);
}

// A lone query against int8 keys, in integers: the scaled query q' as alpha * (a + b / 2^15) with a
// and b int16 (a = round(q' / alpha), alpha = max|q'| / 32767; b the remainder's next 15 bits), so
// that q'.k = alpha * (a.k + b.k / 2^15) with a.k and b.k exact int32 dot products (vpdpwssd: 32
// channels per instruction, no conversion of the keys to fp32). The representation error is below
// 2^-16 alpha per channel, finer than fp32's own rounding of q'; int32 holds the products up to head
// size 128 (32767 * 128 * 128 < 2^31). Half the instructions of the fp32 products: at the 1.3B's
// heads (16 x 128, 2,000 positions) a decode call took 20% less time on one thread, ~10% on two.
// (Values summed in integers as well, with the weights split into bytes for vpdpbusd, measured no
// faster on two threads: the two threads then wait on the cache's reads, at ~60% of a plain
// streaming read's bandwidth.)
template <int ND>
struct SplitQuery {
  static constexpr int NW = ND / 2;  // vectors of 32 int16 channels
  __m512i a[NW], b[NW];
  __m512 alpha;
};

template <int ND>
NEO_AVX512 NEO_INLINE void split_query(const __m512 (&qs)[ND], SplitQuery<ND>& q) {
  __m512 top = _mm512_abs_ps(qs[0]);
  for (int c = 1; c < ND; ++c) top = _mm512_max_ps(top, _mm512_abs_ps(qs[c]));
  const float amax = _mm512_reduce_max_ps(top);
  const float inverse = amax > 0.f ? 32767.f / amax : 0.f;
  q.alpha = _mm512_set1_ps(amax / 32767.f);
  __m256i a[ND], b[ND];
  for (int c = 0; c < ND; ++c) {
    const __m512 x = _mm512_mul_ps(qs[c], _mm512_set1_ps(inverse));
    const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(x, whole), _mm512_set1_ps(32768.f));
    // |whole| <= 32767 and |rest| <= 16384: both fit int16.
    a[c] = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(whole));
    b[c] = _mm512_cvtepi32_epi16(_mm512_cvt_roundps_epi32(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (int w = 0; w < SplitQuery<ND>::NW; ++w) {
    q.a[w] = _mm512_inserti64x4(_mm512_castsi256_si512(a[2 * w]), a[2 * w + 1], 1);
    q.b[w] = _mm512_inserti64x4(_mm512_castsi256_si512(b[2 * w]), b[2 * w + 1], 1);
  }
}

template <int ND>
NEO_AVX512 NEO_INLINE float int16_scores(const SplitQuery<ND>& q, const int8_t* kq, int count, BlockScores& b) {
  constexpr int D = ND * 16;
  b.groups = (count + 15) / 16;
  __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 fraction = _mm512_set1_ps(1.f / 32768.f);
  for (int g = 0; g < b.groups; ++g) {
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) {
      const int row = g * 16 + j;
      if (row >= count) {  // the cache may end here: no reads past the block
        dots[j] = _mm512_setzero_ps();
        continue;
      }
      __m512i whole = _mm512_setzero_si512(), rest = _mm512_setzero_si512();
      for (int w = 0; w < SplitQuery<ND>::NW; ++w) {
        const __m512i k = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kq + row * D + w * 32)));
        whole = _mm512_dpwssd_epi32(whole, k, q.a[w]);
        rest = _mm512_dpwssd_epi32(rest, k, q.b[w]);
      }
      dots[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest), fraction, _mm512_cvtepi32_ps(whole));
    }
    block_max = finish_group(b, g, count, dots, q.alpha, block_max);
  }
  return _mm512_reduce_max_ps(block_max);
}

// The online softmax's step over one block's scores: the running maximum, sum and output (A
// accumulator sets of ND vectors: keys in turn feed the sets, as one set would chain every key's FMA
// on the previous one).
template <int ND, int A, bool CONVERTED>
NEO_AVX512 NEO_INLINE void accumulate(const BlockScores& b, float top, __m512 (&o)[A * ND], float& max, float& sum,
                                      const float* vb, const int8_t* vq, int count) {
  constexpr int D = ND * 16;
  if (top > max) {
    // The running output and sum were relative to the old maximum.
    const float rescale = std::exp(max - top);
    for (int c = 0; c < A * ND; ++c) o[c] = _mm512_mul_ps(o[c], _mm512_set1_ps(rescale));
    sum *= rescale;
    max = top;
  }
  alignas(64) float weights[kBlockKeys];
  __m512 total = _mm512_setzero_ps();
  for (int g = 0; g < b.groups; ++g) {
    const __m512 e = _mm512_maskz_mov_ps(b.valid[g], x86::exp_clamped(_mm512_sub_ps(b.s[g], _mm512_set1_ps(max))));
    total = _mm512_add_ps(total, e);
    _mm512_store_ps(weights + g * 16, e);
  }
  sum += _mm512_reduce_add_ps(total);
  int j = 0;
  for (; j + A <= count; j += A) {
    for (int a = 0; a < A; ++a) {
      const __m512 w = _mm512_set1_ps(weights[j + a]);
      for (int c = 0; c < ND; ++c)
        o[a * ND + c] = _mm512_fmadd_ps(w, row_chunk<CONVERTED>(vb, vq, j + a, D, c), o[a * ND + c]);
    }
  }
  for (; j < count; ++j) {
    const __m512 w = _mm512_set1_ps(weights[j]);
    for (int c = 0; c < ND; ++c) o[c] = _mm512_fmadd_ps(w, row_chunk<CONVERTED>(vb, vq, j, D, c), o[c]);
  }
}

// One block of up to 64 keys for one query's online softmax, in fp32: scores of the scaled query qs
// against rows [0, count) of the block (16 row dot products reduced to one vector per 16 keys), then
// the softmax step. 64 keys per step, not 16: the step's horizontal maximum, sum and exp are a
// serial chain that at 16 keys cost as much as the products.
template <int ND, int A, bool CONVERTED>
NEO_AVX512 NEO_INLINE void key_block(const __m512 (&qs)[ND], __m512 (&o)[A * ND], float& max, float& sum,
                                     const float* kb, const int8_t* kq, const float* vb, const int8_t* vq, int count) {
  BlockScores b;
  const float top = fp32_scores<ND, CONVERTED>(qs, kb, kq, count, b);
  accumulate<ND, A, CONVERTED>(b, top, o, max, sum, vb, vq, count);
}

template <int ND>
NEO_AVX512 NEO_INLINE void scaled_query(const AttentionProblem& p, int64_t b, int64_t i, int64_t h, __m512 (&qs)[ND]) {
  const float* q = p.query(b, i, h);
  const float* ks = p.k_scale + h * ND * 16;
  for (int c = 0; c < ND; ++c) qs[c] = _mm512_mul_ps(_mm512_loadu_ps(q + c * 16), _mm512_loadu_ps(ks + c * 16));
}

// out = o / sum * v_scale, the A sets added up first; zeros for a query without keys.
template <int ND, int A>
NEO_AVX512 NEO_INLINE void finish(__m512 (&o)[A * ND], float sum, const float* vs, float* out) {
  for (int a = 1; a < A; ++a)
    for (int c = 0; c < ND; ++c) o[c] = _mm512_add_ps(o[c], o[a * ND + c]);
  const __m512 inverse = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
  for (int c = 0; c < ND; ++c)
    _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(_mm512_mul_ps(o[c], inverse), _mm512_loadu_ps(vs + c * 16)));
}

template <int ND>
constexpr int accumulator_sets() { return ND >= 8 ? 1 : 8 / ND; }  // 8 independent chains

constexpr int64_t kPrefetchBlocks = 4;

NEO_AVX512 NEO_INLINE void prefetch_rows(const AttentionProblem& p, int64_t b, int64_t h, int64_t j0, int64_t j1) {
  const char* keys = reinterpret_cast<const char*>(p.key_row(b, h, j0));
  const char* values = reinterpret_cast<const char*>(p.value_row(b, h, j0));
  for (int64_t offset = 0; offset < (j1 - j0) * p.head_size; offset += 64) {
    _mm_prefetch(keys + offset, _MM_HINT_T0);
    _mm_prefetch(values + offset, _MM_HINT_T0);
  }
}

// A decode step's queries (fewer than 4 in the task): each reads its rows once, straight from the cache.
template <int ND>
NEO_AVX512 void attend_direct(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  constexpr int D = ND * 16, A = accumulator_sets<ND>();
  for (int64_t i = i0; i < i1; ++i) {
    int64_t first, last;
    p.key_range(b, i, &first, &last);
    __m512 qs[ND], o[A * ND];
    scaled_query<ND>(p, b, i, h, qs);
    SplitQuery<(ND >= 2 ? ND : 2)> split;
    if constexpr (ND >= 2) split_query<ND>(qs, split);
    for (int c = 0; c < A * ND; ++c) o[c] = _mm512_setzero_ps();
    float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
    // Every line of the keys and values kPrefetchBlocks blocks ahead (the first ones up front): the
    // hardware prefetcher alone kept too few misses in flight for these two interleaved streams
    // (9.5 GB/s at 2,000 positions of the 1.3B's heads; 14.6 with 4 blocks ahead).
    for (int64_t j0 = first; j0 <= last && j0 < first + kPrefetchBlocks * kBlockKeys; j0 += kBlockKeys)
      prefetch_rows(p, b, h, j0, std::min(last + 1, j0 + kBlockKeys));
    for (int64_t j0 = first; j0 <= last; j0 += kBlockKeys) {
      const int64_t ahead = j0 + kPrefetchBlocks * kBlockKeys;
      if (ahead <= last) prefetch_rows(p, b, h, ahead, std::min(last + 1, ahead + kBlockKeys));
      const int count = static_cast<int>(std::min<int64_t>(kBlockKeys, last - j0 + 1));
      if constexpr (ND >= 2) {
        BlockScores scores;
        const float top = int16_scores<ND>(split, p.key_row(b, h, j0), count, scores);
        accumulate<ND, A, false>(scores, top, o, max, sum, nullptr, p.value_row(b, h, j0), count);
      } else {
        key_block<ND, A, false>(qs, o, max, sum, nullptr, p.key_row(b, h, j0), nullptr, p.value_row(b, h, j0), count);
      }
    }
    finish<ND, A>(o, sum, p.v_scale + h * D, p.out + (b * p.seq + i) * p.heads * D + h * D);
  }
}

// Prompt queries: keys and values converted to fp32 a tile at a time (~32 KB, staying in L1 while
// every query of the task reads it: one pass per query over fp32 rows held in L2 made the loads the
// bottleneck), each query's softmax state kept between tiles.
template <int ND>
NEO_AVX512 void attend_tiled(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  constexpr int D = ND * 16, A = accumulator_sets<ND>();
  constexpr int64_t kTile = std::max(kBlockKeys, 4096 / D);  // keys per tile: K and V tiles of 16 KB each
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  for (int64_t i = i0; i < i1; ++i) {
    int64_t first, last;
    p.key_range(b, i, &first, &last);
    if (last >= first) lo = std::min(lo, first), hi = std::max(hi, last);
  }
  const int64_t queries = i1 - i0;
  thread_local std::vector<float> buffer;
  // K and V tiles (a block's worth of slack: its reads past the tile's end are masked off), then per
  // query its ND output vectors, maximum and sum.
  const size_t tile_floats = static_cast<size_t>((kTile + kBlockKeys) * D);
  const size_t floats = 2 * tile_floats + static_cast<size_t>(queries * (D + 16)) + 16;
  if (buffer.size() < floats) buffer.resize(floats);
  float* kf = buffer.data();
  float* vf = kf + tile_floats;
  float* state = vf + tile_floats;
  for (int64_t q = 0; q < queries; ++q) {
    float* st = state + q * (D + 16);
    std::fill(st, st + D, 0.f);
    st[D] = -std::numeric_limits<float>::infinity();
    st[D + 1] = 0.f;
  }
  for (int64_t t0 = lo; t0 <= hi; t0 += kTile) {
    const int64_t t1 = std::min(hi + 1, t0 + kTile);
    to_float<ND>(p.key_row(b, h, t0), t1 - t0, kf);
    to_float<ND>(p.value_row(b, h, t0), t1 - t0, vf);
    for (int64_t i = i0; i < i1; ++i) {
      int64_t first, last;
      p.key_range(b, i, &first, &last);
      first = std::max(first, t0);
      last = std::min(last, t1 - 1);
      if (last < first) continue;
      float* st = state + (i - i0) * (D + 16);
      __m512 qs[ND], o[A * ND];
      scaled_query<ND>(p, b, i, h, qs);
      for (int c = 0; c < ND; ++c) o[c] = _mm512_loadu_ps(st + c * 16);
      for (int c = ND; c < A * ND; ++c) o[c] = _mm512_setzero_ps();
      float max = st[D], sum = st[D + 1];
      for (int64_t j0 = first; j0 <= last; j0 += kBlockKeys) {
        key_block<ND, A, true>(qs, o, max, sum, kf + (j0 - t0) * D, nullptr, vf + (j0 - t0) * D, nullptr,
                               static_cast<int>(std::min<int64_t>(kBlockKeys, last - j0 + 1)));
      }
      for (int a = 1; a < A; ++a)
        for (int c = 0; c < ND; ++c) o[c] = _mm512_add_ps(o[c], o[a * ND + c]);
      for (int c = 0; c < ND; ++c) _mm512_storeu_ps(st + c * 16, o[c]);
      st[D] = max;
      st[D + 1] = sum;
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    const float* st = state + (i - i0) * (D + 16);
    __m512 o[A * ND];
    for (int c = 0; c < ND; ++c) o[c] = _mm512_loadu_ps(st + c * 16);
    for (int c = ND; c < A * ND; ++c) o[c] = _mm512_setzero_ps();
    finish<ND, A>(o, st[D + 1], p.v_scale + h * D, p.out + (b * p.seq + i) * p.heads * D + h * D);
  }
}

// Prompt queries with the queries in lanes: up to 32 a call, as two vectors. Both products are then
// register-blocked matrix products with no horizontal sums. The scores of 8 keys against 32
// queries come from 16 accumulators, each step loading 2 query vectors and broadcasting 8 key
// channels. The output of 16 / ND queries then gathers ND value vectors per key. The online
// softmax's maxima, sums and rescaling are vertical, one lane per query. attend_tiled reduced 16
// row products per 16 keys and loaded each key and value vector once per query; at 128 prompt
// tokens over 896 positions of the 125M's heads it ran at ~20% of the FMA rate.
constexpr int kBlockedQueries = 32;

template <int ND>
NEO_AVX512 void attend_blocked(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  constexpr int D = ND * 16, QP = kBlockedQueries, NQ = QP / 16;
  constexpr int KR = 8;        // keys per score block
  constexpr int QR = 16 / ND;  // queries per output block: 16 accumulators
  // Keys per tile: K and V tiles of 16 KB each as fp32.
  constexpr int64_t kTile = 4096 / D < 32 ? 32 : 4096 / D;
  const int64_t queries = i1 - i0;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  thread_local std::vector<float> buffer;
  const size_t floats = static_cast<size_t>(D * QP + 2 * kTile * D + kTile * QP + QP * D + 4 * QP);
  if (buffer.size() < floats) buffer.resize(floats);
  float* qt = buffer.data();           // [D][QP]: scaled queries, transposed
  float* kf = qt + D * QP;              // [kTile][D]
  float* vf = kf + kTile * D;           // [kTile][D]
  float* st = vf + kTile * D;           // [kTile][QP]: scores, then weights
  float* o = st + kTile * QP;           // [QP][D]: running outputs
  float* rescale = o + QP * D;          // [QP]
  float* sums = rescale + QP;           // [QP]
  int32_t* range = reinterpret_cast<int32_t*>(sums + QP);  // [2][QP]: each lane's first and last key
  const float* ks = p.k_scale + h * D;
  for (int64_t q = 0; q < QP; ++q) {
    int64_t first = 0, last = -1;  // lanes past the task's queries see nothing
    if (q < queries) p.key_range(b, i0 + q, &first, &last);
    range[q] = static_cast<int32_t>(first);
    range[QP + q] = static_cast<int32_t>(last);
    if (last >= first) lo = std::min(lo, first), hi = std::max(hi, last);
    const float* x = q < queries ? p.query(b, i0 + q, h) : nullptr;
    for (int d = 0; d < D; ++d) qt[d * QP + q] = x ? x[d] * ks[d] : 0.f;
  }
  std::fill(o, o + QP * D, 0.f);
  __m512 max[NQ], sum[NQ];
  for (int n = 0; n < NQ; ++n) max[n] = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sum[n] = _mm512_setzero_ps();
  const int live = static_cast<int>((queries + QR - 1) / QR) * QR;  // output blocks with a query in them
  for (int64_t t0 = lo; t0 <= hi; t0 += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(hi + 1 - t0, kTile));
    const int padded = (count + KR - 1) / KR * KR;
    to_float<ND>(p.key_row(b, h, t0), count, kf);
    to_float<ND>(p.value_row(b, h, t0), count, vf);
    std::fill(kf + count * D, kf + padded * D, 0.f);  // scored, then masked off
    for (int j0 = 0; j0 < padded; j0 += KR) {
      __m512 acc[KR][NQ];
      for (int r = 0; r < KR; ++r)
        for (int n = 0; n < NQ; ++n) acc[r][n] = _mm512_setzero_ps();
      const float* keys = kf + j0 * D;
      for (int d = 0; d < D; ++d) {
        __m512 qv[NQ];
        for (int n = 0; n < NQ; ++n) qv[n] = _mm512_loadu_ps(qt + d * QP + n * 16);
        for (int r = 0; r < KR; ++r) {
          const __m512 k = _mm512_set1_ps(keys[r * D + d]);
          for (int n = 0; n < NQ; ++n) acc[r][n] = _mm512_fmadd_ps(k, qv[n], acc[r][n]);
        }
      }
      for (int r = 0; r < KR; ++r)
        for (int n = 0; n < NQ; ++n) _mm512_storeu_ps(st + (j0 + r) * QP + n * 16, acc[r][n]);
    }
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int n = 0; n < NQ; ++n) {
      const __m512i first = _mm512_loadu_si512(range + n * 16), last = _mm512_loadu_si512(range + QP + n * 16);
      __m512 top = minus_inf;
      for (int j = 0; j < count; ++j) {
        const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(t0 + j));
        const __mmask16 valid = _mm512_cmpge_epi32_mask(key, first) & _mm512_cmple_epi32_mask(key, last);
        const __m512 s = _mm512_mask_loadu_ps(minus_inf, valid, st + j * QP + n * 16);
        _mm512_storeu_ps(st + j * QP + n * 16, s);
        top = _mm512_max_ps(top, s);
      }
      const __m512 next = _mm512_max_ps(max[n], top);
      // A lane that had no key yet has nothing to rescale (and -inf - -inf would be NaN).
      const __mmask16 had = _mm512_cmp_ps_mask(max[n], minus_inf, _CMP_GT_OQ);
      const __m512 factor = _mm512_maskz_mov_ps(had, x86::exp_clamped(_mm512_sub_ps(max[n], next)));
      __m512 total = _mm512_setzero_ps();
      for (int j = 0; j < count; ++j) {
        const __m512 s = _mm512_loadu_ps(st + j * QP + n * 16);
        const __mmask16 valid = _mm512_cmp_ps_mask(s, minus_inf, _CMP_GT_OQ);
        const __m512 e = _mm512_maskz_mov_ps(valid, x86::exp_clamped(_mm512_sub_ps(s, next)));
        _mm512_storeu_ps(st + j * QP + n * 16, e);
        total = _mm512_add_ps(total, e);
      }
      sum[n] = _mm512_fmadd_ps(sum[n], factor, total);
      max[n] = next;
      _mm512_storeu_ps(rescale + n * 16, factor);
    }
    for (int q0 = 0; q0 < live; q0 += QR) {
      __m512 acc[QR][ND];
      for (int r = 0; r < QR; ++r) {
        const __m512 f = _mm512_set1_ps(rescale[q0 + r]);
        for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + (q0 + r) * D + c * 16), f);
      }
      for (int j = 0; j < count; ++j) {
        __m512 v[ND];
        for (int c = 0; c < ND; ++c) v[c] = _mm512_loadu_ps(vf + j * D + c * 16);
        for (int r = 0; r < QR; ++r) {
          const __m512 w = _mm512_set1_ps(st[j * QP + q0 + r]);
          for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_fmadd_ps(w, v[c], acc[r][c]);
        }
      }
      for (int r = 0; r < QR; ++r)
        for (int c = 0; c < ND; ++c) _mm512_storeu_ps(o + (q0 + r) * D + c * 16, acc[r][c]);
    }
  }
  for (int n = 0; n < NQ; ++n) _mm512_storeu_ps(sums + n * 16, sum[n]);
  for (int64_t q = 0; q < queries; ++q) {
    __m512 out[ND];
    for (int c = 0; c < ND; ++c) out[c] = _mm512_loadu_ps(o + q * D + c * 16);
    finish<ND, 1>(out, sums[q], p.v_scale + h * D, p.out + (b * p.seq + i0 + q) * p.heads * D + h * D);
  }
}

template <int ND>
NEO_AVX512 void attend(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  // Converting the keys once pays from a few queries on; a decode step's lone query reads each
  // cached row once, and a copy would only add its writes. Queries in lanes pay once they fill
  // most of a vector.
  if (i1 - i0 >= 12) {
    for (int64_t q = i0; q < i1; q += kBlockedQueries) attend_blocked<ND>(p, b, h, q, std::min(i1, q + kBlockedQueries));
  } else if (i1 - i0 >= 4) {
    attend_tiled<ND>(p, b, h, i0, i1);
  } else {
    attend_direct<ND>(p, b, h, i0, i1);
  }
}

}  // namespace

// One vector of 16 channels: round half to even of k x (1 / scale), saturated, NaN as 0, as the portable loop does it
// (its scalar nearbyintf calls were a tenth of a long prompt's attention once the attention was on
// tiles).
NEO_AVX512 NEO_INLINE void quantize16(const float* x, const float* scale, int8_t* out) {
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(scale))),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // NaN as 0, as the portable write does (max would turn it into -128).
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-128.f)), _mm512_set1_ps(127.f));
  const __m512 c = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q, q, _CMP_ORD_Q), clamped);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c)));
}

NEO_AVX512 void write_new_positions_avx512(const AttentionProblem& p, int64_t b, int64_t h) {
  const int64_t d_count = p.head_size;
  const float* ks = p.k_scale + h * d_count;
  const float* vs = p.v_scale + h * d_count;
  for_each_new_position(p, b, h, [&](const float* k, const float* v, int8_t* kr, int8_t* vr) NEO_AVX512 {
    for (int64_t d = 0; d < d_count; d += 16) {
      quantize16(k + d, ks + d, kr + d);
      quantize16(v + d, vs + d, vr + d);
    }
  });
}

NEO_AVX512 void nan_for_nonfinite_queries(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const int64_t d = p.head_size;
  for (int64_t i = i0; i < i1; ++i) {
    if (x86::finite_vector(p.query(b, i, h), d)) continue;
    float* out = p.out + (b * p.seq + i) * p.heads * d + h * d;
    std::fill(out, out + d, std::numeric_limits<float>::quiet_NaN());
  }
}

bool attend_avx512_applies(const AttentionProblem& p) {
  return p.head_size == 16 || p.head_size == 32 || p.head_size == 64 || p.head_size == 128;
}

void attend_avx512(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  switch (p.head_size) {
    case 16: attend<1>(p, b, h, i0, i1); break;
    case 32: attend<2>(p, b, h, i0, i1); break;
    case 64: attend<4>(p, b, h, i0, i1); break;
    default: attend<8>(p, b, h, i0, i1); break;
  }
}

}  // namespace neoedge

#endif
