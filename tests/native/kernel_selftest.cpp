// Checks every kernel path this CPU runs against the portable one, without onnxruntime: for
// architectures where onnxruntime and Python are not at hand (arm64 under qemu-user, for example).
//
//   aarch64-linux-gnu-g++ -O2 -std=c++17 -I neoedge/kernels -o selftest tests/native/kernel_selftest.cpp \
//       neoedge/kernels/{isa,portable,avx2,avx512,amx,neon}.cpp -static && qemu-aarch64 ./selftest
//
// The portable path itself is checked against a numpy reference of MatMulNBits by tests/test_kernels.py.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "qgemm.h"

using namespace neoedge;

static bool serial(const void*, void (*fn)(void*, size_t), size_t total, void* user) {
  for (size_t i = 0; i < total; ++i) fn(user, i);
  return true;
}

int main() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  const Parallel parallel{serial, nullptr};
  int failures = 0, checked = 0;
  for (Isa isa : {Isa::neon, Isa::avx2, Isa::avxvnni, Isa::avx512vnni, Isa::amx}) {
    if (!isa_supported(isa)) continue;
    for (int bits : {4, 8})
      for (int block : {16, 32, 64, 128, 256})
        for (bool zero_points : {false, true})
          for (int64_t m : {1, 3, 8, 17, 130}) {
            const int64_t k = block * (1 + rng() % 4), n = 1 + rng() % 70, blocks = k / block;
            std::vector<float> a(m * k), scales(n * blocks), y0(m * n), y1(m * n);
            std::vector<uint8_t> b(n * k * bits / 8), zp(n * (bits == 8 ? blocks : (blocks + 1) / 2));
            for (auto& v : a) v = uniform(rng) * 4.f;
            for (auto& v : scales) v = uniform(rng) * 0.1f;
            for (auto& v : b) v = static_cast<uint8_t>(rng());
            for (auto& v : zp) v = static_cast<uint8_t>(rng());
            Problem p{a.data(), m, k, n, b.data(), scales.data(), zero_points ? zp.data() : nullptr, bits, block, y0.data()};
            run(p, parallel, Isa::portable);
            p.y = y1.data();
            run(p, parallel, isa);
            double worst = 0, scale = 1e-30;
            for (size_t i = 0; i < y0.size(); ++i) {
              worst = std::fmax(worst, std::fabs(y0[i] - y1[i]));
              scale = std::fmax(scale, std::fabs(y0[i]));
            }
            ++checked;
            if (worst > 1e-4 * scale) {
              ++failures;
              std::printf("FAIL %s bits=%d block=%d zp=%d M=%ld K=%ld N=%ld: max diff %g of %g\n", isa_name(isa), bits,
                          block, zero_points, static_cast<long>(m), static_cast<long>(k), static_cast<long>(n), worst, scale);
            }
          }
  }
  std::printf("%d cases, %d failures (best path here: %s)\n", checked, failures, isa_name(best_isa()));
  return failures ? 1 : 0;
}
