// AVX-512 attention over the int8 cache (semantics in attention.h).
//
// Per task (one row, one head, up to 32 queries): the keys and values the task's queries see are
// converted to fp32 once, into per-thread buffers, and shared by the queries. Then each query runs
// an online softmax over blocks of 16 keys, its scaled query and its output accumulator held in
// registers: 16 row dot products reduced to one vector of 16 scores, the block's maximum and exp in
// vector form, the running output rescaled only when the maximum moves. The value scales are
// applied once at the end (they are per channel, constant over keys); the key scales are folded
// into the query.
#include "attention.h"
#include "x86.h"

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

// exp(x) for x <= 0 (scores minus their running maximum): 2^n e^r with |r| <= ln2 / 2 and a
// degree-7 Taylor polynomial (relative error ~1e-7); below -87 it flushes towards 0.
NEO_AVX512 NEO_INLINE __m512 exp_negative(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 e = _mm512_set1_ps(1.f / 5040.f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 720.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, n);
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

template <int ND>
NEO_AVX512 void attend(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  constexpr int D = ND * 16;
  const float* ks = p.k_scale + h * D;
  const float* vs = p.v_scale + h * D;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  for (int64_t i = i0; i < i1; ++i) {
    int64_t first, last;
    p.key_range(b, i, &first, &last);
    if (last >= first) lo = std::min(lo, first), hi = std::max(hi, last);
  }
  thread_local std::vector<float> key_buffer, value_buffer;
  const int64_t keys = hi >= lo ? hi - lo + 1 : 0;
  // Rounded up to a block of 16 rows (zeros past the end, masked off) plus slack.
  const size_t floats = static_cast<size_t>((keys + 16) * D);
  if (key_buffer.size() < floats) key_buffer.resize(floats), value_buffer.resize(floats);
  float* kf = key_buffer.data();
  float* vf = value_buffer.data();
  if (keys) {
    to_float<ND>(p.key_row(b, h, lo), keys, kf);
    to_float<ND>(p.value_row(b, h, lo), keys, vf);
  }
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = i0; i < i1; ++i) {
    float* out = p.out + (b * p.seq + i) * p.heads * D + h * D;
    int64_t first, last;
    p.key_range(b, i, &first, &last);
    if (last < first) {
      for (int c = 0; c < ND; ++c) _mm512_storeu_ps(out + c * 16, _mm512_setzero_ps());
      continue;
    }
    const float* q = p.query(b, i, h);
    __m512 qs[ND], o[ND];
    for (int c = 0; c < ND; ++c) {
      qs[c] = _mm512_mul_ps(_mm512_loadu_ps(q + c * 16), _mm512_loadu_ps(ks + c * 16));
      o[c] = _mm512_setzero_ps();
    }
    float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t j0 = first; j0 <= last; j0 += 16) {
      const int count = static_cast<int>(std::min<int64_t>(16, last - j0 + 1));
      const float* kb = kf + (j0 - lo) * D;
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        __m512 acc = _mm512_mul_ps(qs[0], _mm512_loadu_ps(kb + j * D));
        for (int c = 1; c < ND; ++c) acc = _mm512_fmadd_ps(qs[c], _mm512_loadu_ps(kb + j * D + c * 16), acc);
        dots[j] = acc;
      }
      const __mmask16 valid = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(count));
      const __m512 s = _mm512_mask_mov_ps(minus_infinity, valid, reduce16(dots));
      const float block_max = _mm512_reduce_max_ps(s);
      if (block_max > max) {
        // The running output and sum were relative to the old maximum.
        const float rescale = std::exp(max - block_max);
        for (int c = 0; c < ND; ++c) o[c] = _mm512_mul_ps(o[c], _mm512_set1_ps(rescale));
        sum *= rescale;
        max = block_max;
      }
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_negative(_mm512_sub_ps(s, _mm512_set1_ps(max))));
      sum += _mm512_reduce_add_ps(e);
      alignas(64) float weights[16];
      _mm512_store_ps(weights, e);
      const float* vb = vf + (j0 - lo) * D;
      for (int j = 0; j < count; ++j) {
        const __m512 w = _mm512_set1_ps(weights[j]);
        for (int c = 0; c < ND; ++c) o[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vb + j * D + c * 16), o[c]);
      }
    }
    const __m512 inverse = _mm512_set1_ps(1.f / sum);
    for (int c = 0; c < ND; ++c)
      _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(_mm512_mul_ps(o[c], inverse), _mm512_loadu_ps(vs + c * 16)));
  }
}

}  // namespace

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
