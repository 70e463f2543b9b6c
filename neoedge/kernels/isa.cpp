// Which kernel paths this CPU and OS can run, decided once at run time (one binary runs everywhere).
#include <cstring>
#include <mutex>

#include "qgemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define NEO_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#if defined(__aarch64__) || defined(_M_ARM64)
#define NEO_ARM64 1
#endif

namespace neoedge {

namespace {

constexpr const char* kNames[] = {"portable", "neon", "avx2", "avxvnni", "avx512vnni", "amx"};

#if NEO_X86
struct Regs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

Regs cpuid(unsigned leaf, unsigned subleaf) {
  Regs r;
#if defined(_MSC_VER)
  int out[4];
  __cpuidex(out, static_cast<int>(leaf), static_cast<int>(subleaf));
  r.eax = out[0], r.ebx = out[1], r.ecx = out[2], r.edx = out[3];
#else
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
#endif
  return r;
}

unsigned long long xcr0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
#endif
}

bool bit(unsigned value, int index) { return (value >> index) & 1u; }

// Linux keeps AMX tile data disabled until the process asks for it (arch_prctl XCOMP_PERM).
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureTiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTiledata) != 0) return false;
  unsigned long long permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0) return false;
  return (permitted >> kXfeatureTiledata) & 1ull;
#else
  return false;  // Windows enables AMX state without a request, but this path is untested there
#endif
}

struct Features {
  bool avx2 = false, avxvnni = false, avx512vnni = false, amx = false, amx_bf16 = false;
  bool amd = false;
};

Features detect() {
  Features f;
  const Regs leaf0 = cpuid(0, 0);
  // "AuthenticAMD" in ebx, edx, ecx.
  f.amd = leaf0.ebx == 0x68747541u && leaf0.edx == 0x69746e65u && leaf0.ecx == 0x444d4163u;
  if (leaf0.eax < 7) return f;
  const Regs leaf1 = cpuid(1, 0);
  const bool osxsave = bit(leaf1.ecx, 27);
  if (!osxsave) return f;
  const unsigned long long xcr = xcr0();
  const bool ymm_state = (xcr & 0x6) == 0x6;    // SSE and AVX state
  const bool zmm_state = (xcr & 0xE6) == 0xE6;  // plus opmask and both ZMM halves
  const bool tile_state = (xcr & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  const Regs leaf7 = cpuid(7, 0);
  const Regs leaf7_1 = cpuid(7, 1);
  const bool fma = bit(leaf1.ecx, 12), f16c = bit(leaf1.ecx, 29);
  f.avx2 = ymm_state && fma && f16c && bit(leaf7.ebx, 5) && bit(leaf7.ebx, 3) && bit(leaf7.ebx, 8);
  f.avxvnni = f.avx2 && bit(leaf7_1.eax, 4);
  const bool avx512 = zmm_state && bit(leaf7.ebx, 16) && bit(leaf7.ebx, 17) && bit(leaf7.ebx, 30) &&
                      bit(leaf7.ebx, 31);  // F, DQ, BW, VL
  f.avx512vnni = f.avx2 && avx512 && bit(leaf7.ecx, 11);
  // AMX path: tiles and int8 tile products, with the AVX-512 VNNI path around them.
  const bool amx = bit(leaf7.edx, 24) && bit(leaf7.edx, 25);
  f.amx = f.avx512vnni && amx && tile_state && request_amx_permission();
  f.amx_bf16 = f.amx && bit(leaf7.edx, 22);  // the bfloat16 tile products (prompt attention)
  return f;
}
#endif

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

bool isa_from_name(const char* name, Isa* out) {
  for (int i = 0; i < static_cast<int>(sizeof(kNames) / sizeof(kNames[0])); ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

#if NEO_X86
const Features& features() {
  static Features detected;
  static std::once_flag once;
  std::call_once(once, [] { detected = detect(); });
  return detected;
}
#endif

bool amx_bf16_supported() {
#if NEO_X86
  return features().amx_bf16;
#else
  return false;
#endif
}

bool prefers_row_streaming() {
#if NEO_X86
  return features().amd;
#else
  return false;
#endif
}

bool isa_supported(Isa isa) {
  if (isa == Isa::portable) return true;
#if NEO_ARM64
  return isa == Isa::neon;
#elif NEO_X86
  const Features& features = neoedge::features();
  switch (isa) {
    case Isa::avx2: return features.avx2;
    case Isa::avxvnni: return features.avxvnni;
    case Isa::avx512vnni: return features.avx512vnni;
    case Isa::amx: return features.amx;
    default: return false;
  }
#else
  return false;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::amx, Isa::avx512vnni, Isa::avxvnni, Isa::avx2, Isa::neon}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::portable;
}

bool run(const Problem& p, const Parallel& parallel, Isa isa) {
  switch (isa) {
#if NEO_X86
    case Isa::amx: return run_avx512(p, parallel, true);
    case Isa::avx512vnni: return run_avx512(p, parallel, false);
    case Isa::avxvnni: return run_avx2(p, parallel, true);
    case Isa::avx2: return run_avx2(p, parallel, false);
#endif
#if NEO_ARM64
    case Isa::neon: return run_neon(p, parallel);
#endif
    default: return run_portable(p, parallel);
  }
}

}  // namespace neoedge
