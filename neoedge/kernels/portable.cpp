// The portable path: plain C++ the compiler vectorises for the baseline of the target (SSE2 on
// x86-64, NEON on arm64). Correct everywhere; the reference the fast paths are measured against.
#include <algorithm>
#include <vector>

#include "qgemm.h"

namespace neoedge {

namespace {

constexpr int64_t kRowsPerTask = 16;

struct Job {
  const Problem* p;
  const int8_t* qa;      // [M, K]
  const float* a_scale;  // [M, blocks]
};

// One block of weights as int16 (w - zero point), ready for a plain dot product.
void unpack_block(const Problem& p, int64_t n, int64_t b, int16_t* out) {
  const uint8_t* src = p.b + n * p.row_bytes() + b * (p.block * p.bits / 8);
  const int zp = p.zero_point(n, b);
  if (p.bits == 8) {
    for (int i = 0; i < p.block; ++i) out[i] = static_cast<int16_t>(src[i] - zp);
  } else {
    for (int i = 0; i < p.block / 2; ++i) {
      out[2 * i] = static_cast<int16_t>((src[i] & 0x0F) - zp);
      out[2 * i + 1] = static_cast<int16_t>((src[i] >> 4) - zp);
    }
  }
}

void rows_task(void* user, size_t task) {
  const Job& job = *static_cast<const Job*>(user);
  const Problem& p = *job.p;
  const int64_t blocks = p.blocks();
  const int64_t n0 = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t n1 = std::min(p.n, n0 + kRowsPerTask);
  int16_t w[256];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.m; ++m) p.y[m * p.n + n] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      unpack_block(p, n, b, w);
      const float w_scale = p.scales[n * blocks + b];
      for (int64_t m = 0; m < p.m; ++m) {
        const int8_t* q = job.qa + m * p.k + b * p.block;
        int32_t sum = 0;
        for (int i = 0; i < p.block; ++i) sum += q[i] * w[i];
        p.y[m * p.n + n] += job.a_scale[m * blocks + b] * w_scale * static_cast<float>(sum);
      }
    }
  }
}

}  // namespace

bool run_portable(const Problem& p, const Parallel& parallel) {
  // Per calling thread: the buffers live as long as the thread and only grow.
  thread_local std::vector<int8_t> qa;
  thread_local std::vector<float> a_scale;
  const int64_t blocks = p.blocks();
  qa.resize(static_cast<size_t>(p.m * p.k));
  a_scale.resize(static_cast<size_t>(p.m * blocks));
  for (int64_t m = 0; m < p.m; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      quantize_block(p.a + m * p.k + b * p.block, p.block, qa.data() + m * p.k + b * p.block,
                     a_scale.data() + m * blocks + b);
    }
  }
  Job job{&p, qa.data(), a_scale.data()};
  return parallel(rows_task, static_cast<size_t>((p.n + kRowsPerTask - 1) / kRowsPerTask), &job);
}

}  // namespace neoedge
