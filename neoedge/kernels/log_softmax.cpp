// log p(target) and whether the target is the argmax, for rows of logits: neoedge/scoring.py's
// log_softmax_at, which evaluation calls on every position of every continuation.
//
// Not an onnxruntime op: the runtime calls it through ctypes on the logits a pass returned. In numpy
// it is six passes over a [rows, 50,257] float32 array (argmax, subtract into a new array, exp, a
// float64 sum), about 30 ms for 128 rows, a fifth of a rolling-perplexity window's time. Here it
// is two reads of each row: its maximum (and the first index holding it), then the float64 sum of
// exp(x - max), with the float32 exp of the attention kernels (relative error ~1e-7).

#include <cmath>
#include <cstdint>
#include <limits>
#include <system_error>
#include <thread>

#include "avx512_exp.h"
#include "qgemm.h"
#include "x86.h"

#include "exports.h"

namespace {

constexpr uint8_t kUnordered = 2;  // a NaN or infinite logit: the caller computes the row the slow way

#if defined(NEO_X86)
NEO_AVX512 void rows_avx512(const float* logits, int64_t first, int64_t last, int64_t vocab, int64_t ld,
                            const int64_t* targets, double* logprobs, uint8_t* greedy) {
  const int64_t full = vocab / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (vocab - full)) - 1u);
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = first; r < last; ++r) {
    const float* x = logits + r * ld;
    __m512 peak = lowest;
    __mmask16 unordered = 0;
    for (int64_t i = 0; i < full; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      peak = _mm512_max_ps(peak, v);
    }
    if (tail) {
      const __m512 v = _mm512_mask_loadu_ps(lowest, tail, x + full);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      peak = _mm512_max_ps(peak, v);
    }
    if (unordered) {
      greedy[r] = kUnordered;
      continue;
    }
    const float m = _mm512_reduce_max_ps(peak);
    if (!std::isfinite(m)) {  // an infinite logit: numpy's answer (NaN) is the caller's to give
      greedy[r] = kUnordered;
      continue;
    }
    int64_t best = 0;
    while (x[best] != m) ++best;  // numpy's argmax: the first index of the maximum
    const __m512 shift = _mm512_set1_ps(m);
    __m512d sum_low = _mm512_setzero_pd(), sum_high = _mm512_setzero_pd();
    for (int64_t i = 0; i < full; i += 16) {
      const __m512 e = neoedge::x86::exp_clamped(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift));
      sum_low = _mm512_add_pd(sum_low, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
      sum_high = _mm512_add_pd(sum_high, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    }
    if (tail) {
      const __m512 e = _mm512_maskz_mov_ps(tail, neoedge::x86::exp_clamped(
                                                     _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + full), shift)));
      sum_low = _mm512_add_pd(sum_low, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
      sum_high = _mm512_add_pd(sum_high, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    }
    const double normaliser = std::log(_mm512_reduce_add_pd(_mm512_add_pd(sum_low, sum_high)));
    const int64_t target = targets[r];
    logprobs[r] = (static_cast<double>(x[target]) - static_cast<double>(m)) - normaliser;
    greedy[r] = best == target ? 1 : 0;
  }
}
#endif

}  // namespace

// 0 when every row is written (greedy[r] 2 marks a row with a NaN or infinite logit, left to the caller); -1 for
// arguments out of range; -2 when this CPU has no AVX-512 (the caller computes every row).
NEO_EXPORT int neoedge_log_softmax_at(const float* logits, int64_t rows, int64_t vocab, int64_t ld,
                                      const int64_t* targets, double* logprobs, uint8_t* greedy) {
  if (rows < 0 || vocab <= 0 || ld < vocab) return -1;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0 || targets[r] >= vocab) return -1;
  }
#if defined(NEO_X86)
  if (!neoedge::isa_supported(neoedge::Isa::avx512vnni)) return -2;
  // Rows are independent; a second thread halves a long pass's time (the session's threads are
  // idle between passes).
  int64_t split = rows;
  std::thread other;
  if (rows >= 16) {
    try {
      other = std::thread(rows_avx512, logits, rows / 2, rows, vocab, ld, targets, logprobs, greedy);
      split = rows / 2;
    } catch (const std::system_error&) {  // no thread to be had: this one does every row
    }
  }
  rows_avx512(logits, 0, split, vocab, ld, targets, logprobs, greedy);
  if (other.joinable()) other.join();
  return 0;
#else
  (void)logits; (void)targets; (void)logprobs; (void)greedy;
  return -2;
#endif
}
