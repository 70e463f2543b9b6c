// AVX-512 building blocks shared by the GEMV, batched-GEMV and GEMM paths (avx512.cpp and
// avx512_batch.cpp): scratch buffers, MLAS-exact activation quantization, a 16 x 16 dword
// transpose.
#pragma once

#include "x86.h"

#if NEO_X86

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace neoedge {
namespace x86 {

template <typename T>
inline T* grow(std::vector<T>& buffer, size_t count) {
  // Scratch buffers only grow, so a steady stream of calls allocates nothing; 64 bytes of slack
  // make every 64-byte vector load of the end in bounds.
  if (buffer.size() < count + 64 / sizeof(T)) buffer.resize(count + 64 / sizeof(T));
  return buffer.data();
}

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// acc += u8 x s8 per dword, in the accumulator's own register (GCC 12 may otherwise copy it around
// each product, see avx512_batch.cpp).
NEO_AVX512 NEO_INLINE void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
#else
  acc = _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

// acc += u8 x (the 4 bytes at s8, in every dword): the broadcast embedded in the product's memory
// operand ({1to16}) instead of a vpbroadcastd of its own. In the tiled decode GEMV (one broadcast
// per product) the separate broadcasts were half the instructions of the loop.
NEO_AVX512 NEO_INLINE void dpbusd_broadcast(__m512i& acc, __m512i u8, const int8_t* s8) {
#if defined(__GNUC__)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*reinterpret_cast<const int32_t*>(s8)));
#else
  int32_t word;
  std::memcpy(&word, s8, 4);
  acc = _mm512_dpbusd_epi32(acc, u8, _mm512_set1_epi32(word));
#endif
}

// 16 floats at p, the lanes of m only: plain for a whole vector (masked loads and stores, even
// with every lane set, cost more on AMD).
NEO_AVX512 NEO_INLINE __m512 load_lanes(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

NEO_AVX512 NEO_INLINE void store_lanes(float* p, __mmask16 m, __m512 v) {
  if (m == 0xFFFF) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}

// 4 bytes at p in every dword.
NEO_AVX512 NEO_INLINE __m512i broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm512_set1_epi32(word);
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (MLAS CompInt8 semantics, see qgemm.h)

struct QuantizedBlock {
  float scale;
  int32_t sum;
};

// Quantizes `len` (a multiple of 16) floats into out[0, len).
NEO_AVX512 NEO_INLINE QuantizedBlock quantize_block_avx512(const float* a, int len, int8_t* out) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < len; i += 16) amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, _mm512_loadu_ps(a + i)));
  const float max = _mm512_reduce_max_ps(amax);
  const float scale = max / 127.f;
  const __m512 inverse = _mm512_set1_ps(max != 0.f ? 127.f / max : 0.f);
  __m512i sum = _mm512_setzero_si512();
  for (int i = 0; i < len; i += 16) {
    // cvtps2dq rounds half to even (the default MXCSR mode), as MLAS does.
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a + i), inverse));
    sum = _mm512_add_epi32(sum, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtsepi32_epi8(q));
  }
  return {scale, _mm512_reduce_add_epi32(sum)};
}

// Reorders int8 activations in place, per 8 k: the 4 even k, then the 4 odd ones (len a multiple of
// 8; the last vector masked). A dword of 4-bit weights holds 8 k, the even ones in
// its low nibbles: so ordered, one broadcast of 4 activation bytes meets each nibble half.
NEO_AVX512 NEO_INLINE void split_even_odd(int8_t* q, int64_t len) {
  const __m512i order = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
  for (int64_t k0 = 0; k0 < len; k0 += 64) {
    const int64_t left = len - k0;
    if (left >= 64) {  // plain for whole vectors, as load_lanes
      _mm512_storeu_si512(q + k0, _mm512_shuffle_epi8(_mm512_loadu_si512(q + k0), order));
    } else {
      const __mmask64 mask = (1ull << left) - 1;
      _mm512_mask_storeu_epi8(q + k0, mask, _mm512_shuffle_epi8(_mm512_maskz_loadu_epi8(mask, q + k0), order));
    }
  }
}

// Transposes 16 rows of 16 dwords in place: r[j] afterwards holds dword j of every input row.
NEO_AVX512 NEO_INLINE void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4g + j]: 128-bit lane l holds dword 4l + j of rows 4g..4g+3
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

}  // namespace x86
}  // namespace neoedge

#endif
