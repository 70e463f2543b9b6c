// arm64 path: NEON (part of every arm64 CPU). Weights are unpacked per block to int8 (w - zero
// point) for 4 bits, widened to int16 for 8 bits; int8 x int8 products widen to int16 and pair-add
// into int32 (vmull_s8 / vpadalq_s16), so no extension beyond base ARMv8 is needed.
// Built only for arm64; on this project's x86 CI it is a compile check at most (see README).
#include "qgemm.h"

#if defined(__aarch64__) || defined(_M_ARM64)

#include <arm_neon.h>

#include <algorithm>
#include <vector>

namespace neoedge {

namespace {

constexpr int64_t kRowsPerTask = 16;

struct Job {
  const Problem* p;
  const int8_t* qa;
  const float* a_scale;
};

int32_t dot_s8(const int8_t* a, const int8_t* w, int len) {
  int32x4_t acc = vdupq_n_s32(0);
  for (int i = 0; i < len; i += 16) {
    const int8x16_t x = vld1q_s8(a + i), y = vld1q_s8(w + i);
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(y)));
    acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(x), vget_high_s8(y)));
  }
  return vaddvq_s32(acc);
}

int32_t dot_s16(const int8_t* a, const int16_t* w, int len) {
  int32x4_t acc = vdupq_n_s32(0);
  for (int i = 0; i < len; i += 8) {
    const int16x8_t x = vmovl_s8(vld1_s8(a + i)), y = vld1q_s16(w + i);
    acc = vmlal_s16(acc, vget_low_s16(x), vget_low_s16(y));
    acc = vmlal_s16(acc, vget_high_s16(x), vget_high_s16(y));
  }
  return vaddvq_s32(acc);
}

void rows_task(void* user, size_t task) {
  const Job& job = *static_cast<const Job*>(user);
  const Problem& p = *job.p;
  const int64_t blocks = p.blocks();
  const int64_t n0 = static_cast<int64_t>(task) * kRowsPerTask, n1 = std::min(p.n, n0 + kRowsPerTask);
  alignas(16) int8_t w8[256];
  alignas(16) int16_t w16[256];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.m; ++m) p.y[m * p.n + n] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* src = p.b + n * p.row_bytes() + b * (p.block * p.bits / 8);
      const int zp = p.zero_point(n, b);
      if (p.bits == 4) {
        for (int i = 0; i < p.block / 2; ++i) {
          w8[2 * i] = static_cast<int8_t>((src[i] & 0x0F) - zp);
          w8[2 * i + 1] = static_cast<int8_t>((src[i] >> 4) - zp);
        }
      } else {
        for (int i = 0; i < p.block; ++i) w16[i] = static_cast<int16_t>(src[i] - zp);
      }
      const float w_scale = p.scales[n * blocks + b];
      for (int64_t m = 0; m < p.m; ++m) {
        const int8_t* q = job.qa + m * p.k + b * p.block;
        const int32_t sum = p.bits == 4 ? dot_s8(q, w8, p.block) : dot_s16(q, w16, p.block);
        p.y[m * p.n + n] += job.a_scale[m * blocks + b] * w_scale * static_cast<float>(sum);
      }
    }
  }
}

}  // namespace

bool run_neon(const Problem& p, const Parallel& parallel) {
  thread_local std::vector<int8_t> qa;
  thread_local std::vector<float> a_scale;
  const int64_t blocks = p.blocks();
  qa.resize(static_cast<size_t>(p.m * p.k));
  a_scale.resize(static_cast<size_t>(p.m * blocks));
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      quantize_block(p.a + m * p.k + b * p.block, p.block, qa.data() + m * p.k + b * p.block,
                     a_scale.data() + m * blocks + b);
  Job job{&p, qa.data(), a_scale.data()};
  return parallel(rows_task, static_cast<size_t>((p.n + kRowsPerTask - 1) / kRowsPerTask), &job);
}

}  // namespace neoedge

#endif
