// Portable row loops of the elementwise ops and their split over the pool (semantics in elementwise.h).
#include "elementwise.h"

#include <algorithm>
#include <cmath>

namespace neoedge {

void skip_norm_rows_portable(const SkipNormProblem& p, int64_t r0, int64_t r1) {
  const int64_t w = p.width;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = p.input + r * w;
    const float* s = p.skip + r * w;
    float* out = p.out + r * w;
    // The row's sum goes to `out` first (or the sum output): the normalisation reads it twice.
    float* row = p.sum ? p.sum + r * w : out;
    double total = 0.0;
    for (int64_t i = 0; i < w; ++i) {
      row[i] = x[i] + s[i] + (p.bias ? p.bias[i] : 0.f);
      total += row[i];
    }
    const float mean = static_cast<float>(total / static_cast<double>(w));
    double squares = 0.0;
    for (int64_t i = 0; i < w; ++i) squares += static_cast<double>(row[i] - mean) * (row[i] - mean);
    const float inverse = 1.f / std::sqrt(static_cast<float>(squares / static_cast<double>(w)) + p.epsilon);
    for (int64_t i = 0; i < w; ++i) out[i] = (row[i] - mean) * inverse * p.gamma[i] + (p.beta ? p.beta[i] : 0.f);
  }
}

void gelu_rows_portable(const GeluProblem& p, int64_t r0, int64_t r1) {
  const int64_t w = p.width;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = p.input + r * w;
    float* out = p.out + r * w;
    for (int64_t i = 0; i < w; ++i) {
      const float v = x[i] + (p.bias ? p.bias[i] : 0.f);
      const float u = v * (0.7978845608028654f + 0.035677408136300125f * v * v);
      out[i] = v / (1.f + std::exp(-2.f * u));
    }
  }
}

namespace {

// Below ~32K elements a call is a few microseconds of work, about what handing out tasks costs
// (a decode step's rows).
constexpr int64_t kParallelElements = 32768;
constexpr int64_t kTasks = 16;

template <typename P>
struct Job {
  const P* p;
  Isa isa;
  int64_t tasks;
  void (*rows)(const P&, int64_t, int64_t);
};

template <typename P>
void task(void* user, size_t index) {
  const Job<P>& job = *static_cast<const Job<P>*>(user);
  const int64_t i = static_cast<int64_t>(index);
  job.rows(*job.p, i * job.p->rows / job.tasks, (i + 1) * job.p->rows / job.tasks);
}

template <typename P>
bool run_rows(const P& p, const Parallel& parallel, Isa isa, void (*portable)(const P&, int64_t, int64_t),
              void (*avx512)(const P&, int64_t, int64_t)) {
  auto rows = portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= Isa::avx512vnni) rows = avx512;
#else
  (void)avx512;
#endif
  if (p.rows * p.width < kParallelElements || p.rows < 2) {
    rows(p, 0, p.rows);
    return true;
  }
  Job<P> job{&p, isa, std::min(p.rows, kTasks), rows};
  return parallel(task<P>, static_cast<size_t>(job.tasks), &job);
}

}  // namespace

bool run_skip_norm(const SkipNormProblem& p, const Parallel& parallel, Isa isa) {
  return run_rows(p, parallel, isa, skip_norm_rows_portable, skip_norm_rows_avx512);
}

bool run_gelu(const GeluProblem& p, const Parallel& parallel, Isa isa) {
  return run_rows(p, parallel, isa, gelu_rows_portable, gelu_rows_avx512);
}

}  // namespace neoedge
