// AVX2 paths, for x86 CPUs without AVX-512: plain AVX2, and AVX-VNNI where the CPU has it (Alder
// Lake and later). One kernel body, avx2_gemv.inc, compiled once per target attribute.
#include "x86.h"

#if NEO_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace neoedge {

namespace avx2_plain {
#define NEO_T NEO_AVX2
#define NEO_VNNI 0
#include "avx2_gemv.inc"
#undef NEO_VNNI
#undef NEO_T
}  // namespace avx2_plain

namespace avx2_vnni {
#define NEO_T NEO_AVXVNNI
#define NEO_VNNI 1
#include "avx2_gemv.inc"
#undef NEO_VNNI
#undef NEO_T
}  // namespace avx2_vnni

bool run_avx2(const Problem& p, const Parallel& parallel, bool vnni) {
  return vnni ? avx2_vnni::run(p, parallel) : avx2_plain::run(p, parallel);
}

}  // namespace neoedge

#endif
