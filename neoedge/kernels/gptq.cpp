// GPTQ's column loop for the export (export/gptq.py), one batch of columns at a time.
//
// Not an onnxruntime op: the export calls it through ctypes. In numpy the loop costs a dozen array
// passes per column and a clipping search of six passes per ratio per block, each over a few
// thousand rows, and it was most of a 125M int4 export's quantization time. Rows are independent
// given H, so here 16 rows at a time keep the batch's columns in a buffer that stays in L1 (128
// columns x 16 rows = 8 KB), and every column's quantization and error spreading is one pass over it.
//
// The arithmetic is numpy's, operation for operation (export/blockwise.py fit_grid, the loop in
// export/gptq.py), except the order of float32 sums (the clipping search's, and each column's
// updates, which numpy applies in sub-batches), so a weight near a rounding boundary or a near-tie
// between two clipping ratios can go the other way; tests/test_quantization.py compares the two.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "qgemm.h"
#include "x86.h"

#include "exports.h"

#ifndef NEO_INLINE
#define NEO_INLINE inline
#endif

// numpy rounds every product before adding it: no fused multiply-adds here (GCC fuses separate
// multiply and add intrinsics by default, and clang those within one expression).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

constexpr int kLanes = 16;  // rows per tile: one AVX-512 vector of float32


struct Batch {
  float* w;                  // [cols, ld]: the batch's columns (a column's rows contiguous)
  int64_t rows, cols, ld;
  const float* u;            // [cols, ldu]: the batch's diagonal block of GPTQ's upper factor
  int64_t ldu;
  const float* importance;   // [cols] or null
  int qmax, block, symmetric;
  const float* ratios;
  int nratios;
  float* scales;             // [rows, ld_grid], from the batch's first block
  uint8_t* zeros;
  int64_t ld_grid;
  uint8_t* codes;            // [cols, ld]
  float* errors;             // [cols, ld]
};

#if defined(NEO_X86)
// In intrinsics: GCC left plain lane loops scalar (roundeven, the clip's selects), 8x slower, and
// a scalar loop is no faster than numpy's, so there is no portable path: without AVX-512 the
// export runs the numpy loop.
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

NEO_AVX512 NEO_INLINE __m512 clip(__m512 x, __m512 low, __m512 high) {
  return _mm512_min_ps(_mm512_max_ps(x, low), high);
}

NEO_AVX512 void fit_block_avx512(const Batch& b, const float* v, int64_t first, __m512* scale, __m512* zero) {
  const __m512 zeros = _mm512_setzero_ps();
  __m512 low = zeros, high = zeros;
  for (int64_t k = first; k < first + b.block; ++k) {
    const __m512 x = _mm512_loadu_ps(v + k * kLanes);
    low = _mm512_min_ps(low, x);
    high = _mm512_max_ps(high, x);
  }
  const __m512 negative_low = _mm512_sub_ps(zeros, low);
  const __m512 extreme = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(negative_low, high, _CMP_GT_OQ), high, low);
  const __m512 one = _mm512_set1_ps(1.0f), qmax = _mm512_set1_ps(static_cast<float>(b.qmax));
  const __m512 mid = _mm512_set1_ps(static_cast<float>((b.qmax + 1) / 2));
  const __m512 negative_mid = _mm512_sub_ps(zeros, mid);
  __m512 best = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int r = 0; r < b.nratios; ++r) {
    const __m512 ratio = _mm512_set1_ps(b.ratios[r]);
    __m512 s, z;
    if (b.symmetric) {
      s = _mm512_div_ps(_mm512_mul_ps(extreme, ratio), negative_mid);
      s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, zeros, _CMP_EQ_OQ), s, one);
      z = mid;
    } else {
      const __m512 lo = _mm512_mul_ps(low, ratio), hi = _mm512_mul_ps(high, ratio);
      s = _mm512_div_ps(_mm512_sub_ps(hi, lo), qmax);
      s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, zeros, _CMP_EQ_OQ), s, one);
      z = clip(_mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(zeros, lo), s), kRound), zeros, qmax);
    }
    const __m512 code_low = _mm512_sub_ps(zeros, z), code_high = _mm512_sub_ps(qmax, z);
    __m512 error = zeros;
    for (int64_t k = first; k < first + b.block; ++k) {
      const __m512 x = _mm512_loadu_ps(v + k * kLanes);
      const __m512 c = clip(_mm512_roundscale_ps(_mm512_div_ps(x, s), kRound), code_low, code_high);
      __m512 e = _mm512_sub_ps(_mm512_mul_ps(c, s), x);
      e = _mm512_mul_ps(e, e);
      if (b.importance) e = _mm512_mul_ps(e, _mm512_set1_ps(b.importance[k]));
      error = _mm512_add_ps(error, e);
    }
    const __mmask16 better = _mm512_cmp_ps_mask(error, best, _CMP_LT_OQ);
    best = _mm512_mask_blend_ps(better, best, error);
    *scale = r == 0 ? s : _mm512_mask_blend_ps(better, *scale, s);
    *zero = r == 0 ? z : _mm512_mask_blend_ps(better, *zero, z);
  }
}

NEO_AVX512 void run_avx512(const Batch& b) {
  std::vector<float> buffer(static_cast<size_t>(b.cols) * kLanes);
  float* v = buffer.data();
  const __m512 zeros = _mm512_setzero_ps(), qmax = _mm512_set1_ps(static_cast<float>(b.qmax));
  for (int64_t first_row = 0; first_row < b.rows; first_row += kLanes) {
    const int64_t lanes = b.rows - first_row < kLanes ? b.rows - first_row : kLanes;
    const __mmask16 valid = static_cast<__mmask16>((1u << lanes) - 1u);
    for (int64_t c = 0; c < b.cols; ++c) {
      _mm512_storeu_ps(v + c * kLanes, _mm512_maskz_loadu_ps(valid, b.w + c * b.ld + first_row));
    }
    __m512 scale = _mm512_set1_ps(1.0f), zero = zeros;
    for (int64_t c = 0; c < b.cols; ++c) {
      if (c % b.block == 0) {
        fit_block_avx512(b, v, c, &scale, &zero);
        alignas(64) float s[kLanes], z[kLanes];
        _mm512_store_ps(s, scale);
        _mm512_store_ps(z, zero);
        const int64_t g = c / b.block;
        for (int64_t l = 0; l < lanes; ++l) {
          b.scales[(first_row + l) * b.ld_grid + g] = s[l];
          b.zeros[(first_row + l) * b.ld_grid + g] = static_cast<uint8_t>(z[l]);
        }
      }
      const __m512 x = _mm512_loadu_ps(v + c * kLanes);
      const __m512 q = clip(_mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(x, scale), kRound), zero), zeros, qmax);
      const __m512 error = _mm512_div_ps(_mm512_sub_ps(x, _mm512_mul_ps(_mm512_sub_ps(q, zero), scale)),
                                         _mm512_set1_ps(b.u[c * b.ldu + c]));
      _mm_mask_storeu_epi8(b.codes + c * b.ld + first_row, valid, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
      _mm512_mask_storeu_ps(b.errors + c * b.ld + first_row, valid, error);
      const float* spread = b.u + c * b.ldu;
      for (int64_t j = c + 1; j < b.cols; ++j) {
        float* later = v + j * kLanes;
        _mm512_storeu_ps(later, _mm512_sub_ps(_mm512_loadu_ps(later), _mm512_mul_ps(_mm512_set1_ps(spread[j]), error)));
      }
    }
  }
}
#endif

}  // namespace

// Returns 0; -1 if an argument is out of range (nothing written then); -2 without AVX-512 (the
// caller runs its own loop).
NEO_EXPORT int neoedge_gptq_batch(float* w, int64_t rows, int64_t cols, int64_t ld, const float* u, int64_t ldu,
                                  const float* importance, int bits, int block, int symmetric, const float* ratios,
                                  int nratios, float* scales, uint8_t* zeros, int64_t ld_grid, uint8_t* codes,
                                  float* errors) {
  if (rows < 0 || cols <= 0 || ld < rows || ldu < cols || block <= 0 || cols % block || nratios <= 0 ||
      (bits != 4 && bits != 8) || ld_grid < cols / block) {
    return -1;
  }
#if defined(NEO_X86)
  if (!neoedge::isa_supported(neoedge::Isa::avx512vnni)) return -2;
  const Batch b{w, rows, cols, ld, u, ldu, importance, (1 << bits) - 1, block, symmetric, ratios, nratios,
                scales, zeros, ld_grid, codes, errors};
  run_avx512(b);
  return 0;
#else
  (void)w; (void)u; (void)importance; (void)ratios; (void)scales; (void)zeros; (void)codes; (void)errors;
  return -2;
#endif
}
