// exp for AVX-512 paths that need it in vector form (attention's softmax, the GELU's sigmoid).
#pragma once

#include "x86.h"

#if NEO_X86

#include <immintrin.h>

namespace neoedge {
namespace x86 {

// exp(x): 2^n e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial (relative error ~1e-7), x
// clamped to [-87, 88] (below, it flushes towards 0; above, it stays finite).
NEO_AVX512 NEO_INLINE __m512 exp_clamped(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
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

// Whether all `count` floats (a multiple of 16) are finite.
NEO_AVX512 NEO_INLINE bool finite_vector(const float* x, int64_t count) {
  __mmask16 bad = 0;
  for (int64_t i = 0; i < count; i += 16) bad |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(x + i), 0x99);  // NaN, +-inf
  return bad == 0;
}

}  // namespace x86
}  // namespace neoedge

#endif
