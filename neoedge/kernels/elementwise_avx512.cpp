// AVX-512 row loops of the elementwise ops (semantics in elementwise.h). Rows of any width: the
// last partial vector of a row is masked.
#include "elementwise.h"
#include "x86.h"
#include "avx512_blocks.h"
#include "avx512_exp.h"

#if NEO_X86

#include <immintrin.h>

#include <cmath>

namespace neoedge {

namespace {

NEO_AVX512 NEO_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

NEO_AVX512 NEO_INLINE __m512 load(const float* p, __mmask16 m) { return x86::load_lanes(p, m); }

}  // namespace

NEO_AVX512 void skip_norm_rows_avx512(const SkipNormProblem& p, int64_t r0, int64_t r1) {
  const int64_t w = p.width;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = p.input + r * w;
    const float* s = p.skip + r * w;
    float* out = p.out + r * w;
    float* row = p.sum ? p.sum + r * w : out;
    __m512 total = zero;
    for (int64_t i = 0; i < w; i += 16) {
      const __mmask16 m = tail_mask(w - i);
      __m512 v = _mm512_add_ps(load(x + i, m), load(s + i, m));
      if (p.bias) v = _mm512_add_ps(v, load(p.bias + i, m));
      x86::store_lanes(row + i, m, v);
      total = _mm512_add_ps(total, v);
    }
    const float mean_value = _mm512_reduce_add_ps(total) / static_cast<float>(w);
    const __m512 mean = _mm512_set1_ps(mean_value);
    __m512 squares = zero;
    for (int64_t i = 0; i < w; i += 16) {
      const __mmask16 m = tail_mask(w - i);
      const __m512 d = _mm512_maskz_sub_ps(m, load(row + i, m), mean);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const float variance = _mm512_reduce_add_ps(squares) / static_cast<float>(w);
    const __m512 inverse = _mm512_set1_ps(1.f / std::sqrt(variance + p.epsilon));
    for (int64_t i = 0; i < w; i += 16) {
      const __mmask16 m = tail_mask(w - i);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load(row + i, m), mean), inverse), load(p.gamma + i, m));
      if (p.beta) v = _mm512_add_ps(v, load(p.beta + i, m));
      x86::store_lanes(out + i, m, v);
    }
  }
}

NEO_AVX512 void gelu_rows_avx512(const GeluProblem& p, int64_t r0, int64_t r1) {
  const int64_t w = p.width;
  const __m512 a = _mm512_set1_ps(0.7978845608028654f), b = _mm512_set1_ps(0.035677408136300125f);
  const __m512 one = _mm512_set1_ps(1.f), minus_two = _mm512_set1_ps(-2.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = p.input + r * w;
    float* out = p.out + r * w;
    for (int64_t i = 0; i < w; i += 16) {
      const __mmask16 m = tail_mask(w - i);
      __m512 v = load(x + i, m);
      if (p.bias) v = _mm512_add_ps(v, load(p.bias + i, m));
      const __m512 u = _mm512_mul_ps(v, _mm512_fmadd_ps(b, _mm512_mul_ps(v, v), a));
      const __m512 e = x86::exp_clamped(_mm512_mul_ps(minus_two, u));
      x86::store_lanes(out + i, m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
    }
  }
}

}  // namespace neoedge

#endif
