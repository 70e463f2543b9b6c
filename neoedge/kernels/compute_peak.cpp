// The int8 multiply-accumulate rate this CPU sustains with AVX-512 VNNI: the compute floor of a
// prompt's GEMMs, as the memory bandwidth is the floor of a decode step (benchmarks/decode_floor.py
// reports a first token against both).
//
// Why measure it rather than derive it from a datasheet: a VM's vCPUs may be SMT siblings of one
// physical core (two threads then share one set of vector units and get no more than one), and
// the clock a guest sees is not the one it runs at. Twelve independent vpdpbusd chains per thread
// cover the instruction's latency on current x86 cores; the operands stay in registers, so nothing
// but the vector units is measured.
#include "exports.h"
#include "qgemm.h"
#include "x86.h"

#include <atomic>
#include <chrono>
#include <exception>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(NEO_X86) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace {

volatile int64_t g_sink;  // the accumulators' total, kept so that no chain is optimised away

// `rounds` rounds of 12 vpdpbusd (64 MACs each); returns a value derived from every accumulator so
// that none of them can be optimised away.
NEO_AVX512 int64_t vnni_rounds(int64_t rounds, int seed) {
  __m512i a0 = _mm512_set1_epi32(seed), a1 = _mm512_set1_epi32(seed + 1), a2 = _mm512_set1_epi32(seed + 2),
          a3 = _mm512_set1_epi32(seed + 3), a4 = _mm512_set1_epi32(seed + 4), a5 = _mm512_set1_epi32(seed + 5),
          a6 = _mm512_set1_epi32(seed + 6), a7 = _mm512_set1_epi32(seed + 7), a8 = _mm512_set1_epi32(seed + 8),
          a9 = _mm512_set1_epi32(seed + 9), a10 = _mm512_set1_epi32(seed + 10), a11 = _mm512_set1_epi32(seed + 11);
  __m512i x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(2);
  for (int64_t i = 0; i < rounds; ++i) {
#define NEO_STEP(a) a = _mm512_dpbusd_epi32(a, x, y);
    NEO_STEP(a0) NEO_STEP(a1) NEO_STEP(a2) NEO_STEP(a3) NEO_STEP(a4) NEO_STEP(a5)
    NEO_STEP(a6) NEO_STEP(a7) NEO_STEP(a8) NEO_STEP(a9) NEO_STEP(a10) NEO_STEP(a11)
#undef NEO_STEP
    // Opaque operands: without this the compiler may merge chains that start alike.
    asm volatile("" : "+v"(x), "+v"(y));
  }
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                               _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
  return _mm512_reduce_add_epi32(s);
}

}  // namespace

// Multiply-accumulates per second (int8, VNNI) on `threads` threads running at once for about
// `seconds`; -1 on a CPU without AVX-512 VNNI, in a build without the probe (MSVC: no inline asm),
// for arguments out of range, or if a thread could not start.
NEO_EXPORT double neoedge_vnni_peak(int threads, double seconds) {
  if (threads < 1 || threads > 1024 || !(seconds > 0.0) || seconds > 60.0) return -1.0;
  if (neoedge::best_isa() < neoedge::Isa::avx512vnni) return -1.0;
  // Calibrate the rounds on one thread so that the timed run lasts about `seconds`.
  int64_t rounds = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    vnni_rounds(rounds, 1);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > seconds / 8 || rounds > (int64_t{1} << 40)) {
      rounds = static_cast<int64_t>(static_cast<double>(rounds) * seconds / (s > 0 ? s : 1e-9)) + 1;
      break;
    }
    rounds *= 4;
  }
  std::atomic<int64_t> sink{0};
  std::vector<std::thread> team;
  bool started = true;
  const auto t0 = std::chrono::steady_clock::now();
  try {  // no exception may cross the C ABI: a thread that cannot start ends the probe with -1
    team.reserve(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) team.emplace_back([&, t] { sink += vnni_rounds(rounds, 3 * t + 1); });
  } catch (const std::exception&) {
    started = false;
  }
  for (auto& member : team) member.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g_sink = sink.load();
  return started ? static_cast<double>(rounds) * 12 * 64 * threads / s : -1.0;
}

#else

NEO_EXPORT double neoedge_vnni_peak(int, double) { return -1.0; }

#endif
