// The row-wise ops between neoedge's graph's MatMuls, with com.microsoft's semantics (onnxruntime
// 1.32, CPU; checked against it by tests/test_kernel_elementwise.py):
//
// - SkipLayerNormalization: sum = input + skip (+ bias), out = (sum - mean) / sqrt(var + epsilon)
//   * gamma (+ beta) over each row's last dimension; sum is an optional output.
// - FastGelu: out = x' * sigmoid(2 u) with x' = x (+ bias) and u = sqrt(2 / pi) (x' + 0.044715 x'^3),
//   which is 0.5 x' (1 + tanh(u)).
//
// Why not onnxruntime's own: at a 128-token prompt chunk of the 125M they took 17% of a prefill
// (0.42 ms per SkipLayerNormalization of 128 x 768, 0.43 ms per FastGelu of 128 x 3,072), several
// times their memory traffic; a decode step runs 36 of them on one row each.
#pragma once

#include <cstdint>

#include "qgemm.h"

namespace neoedge {

struct SkipNormProblem {
  const float* input;  // [rows, width]
  const float* skip;   // [rows, width]
  const float* gamma;  // [width]
  const float* beta;   // [width] or null
  const float* bias;   // [width] or null
  float* out;          // [rows, width]
  float* sum;          // [rows, width] or null
  int64_t rows, width;
  float epsilon;
};

struct GeluProblem {
  const float* input;  // [rows, width]
  const float* bias;   // [width] or null
  float* out;          // [rows, width]
  int64_t rows, width;
};

void skip_norm_rows_portable(const SkipNormProblem& p, int64_t r0, int64_t r1);
void gelu_rows_portable(const GeluProblem& p, int64_t r0, int64_t r1);
void skip_norm_rows_avx512(const SkipNormProblem& p, int64_t r0, int64_t r1);
void gelu_rows_avx512(const GeluProblem& p, int64_t r0, int64_t r1);

// The whole op, on the pool when it is large enough to pay for it. False if the pool failed.
bool run_skip_norm(const SkipNormProblem& p, const Parallel& parallel, Isa isa);
bool run_gelu(const GeluProblem& p, const Parallel& parallel, Isa isa);

}  // namespace neoedge
