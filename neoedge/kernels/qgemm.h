// Y[M, N] = A[M, K] x dequant(B)^T with MatMulNBits' accuracy_level-4 semantics, on every ISA path.
//
// Semantics (what onnxruntime's MLAS CompInt8 path computes, reproduced bit-for-bit up to the order of
// fp32 additions):
// - A is quantized to int8 per row and per block of `block` consecutive k: amax = max|a|,
//   a_scale = amax / 127, q = round-half-even(a * (127 / amax)) (q = 0 when amax = 0).
// - B is MatMulNBits' own layout: uint8 [N, K / block, block * bits / 8]; 4-bit values two per byte,
//   low nibble first. Block scales fp32 [N, K / block]. Zero points uint8 [N, K / block] (8-bit) or
//   [N, ceil((K / block) / 2)] (4-bit, low nibble first); without them the zero point is 2^(bits-1).
// - Y[m, n] = sum_b a_scale[m, b] * w_scale[n, b] * sum_{k in b} q[m, k] * (w[n, k] - zp[n, b]).
//
// Every path keeps the weights where onnxruntime loaded them (no repacked copy: memory matters at
// 1.3B/2.7B; the AVX-512 VNNI path rearranges them there, see tiled.h) and splits its work over
// onnxruntime's intra-op pool through `Parallel`.
#pragma once

#include <cstddef>
#include <cstdint>

namespace neoedge {

// Narrowest first: a path may use every instruction set of the ones before it.
enum class Isa : int { portable = 0, neon = 1, avx2 = 2, avxvnni = 3, avx512vnni = 4, amx = 5 };

const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);
// Paths this CPU and OS can run (AMX also needs the kernel's permission for tile data, asked once).
bool isa_supported(Isa isa);
Isa best_isa();
// The AMX path's bfloat16 tile products (AMX-BF16), which prompt attention uses.
bool amx_bf16_supported();
// Whether the one-row GEMV should read one weight row at a time (one sequential stream per thread)
// rather than 8 rows side by side: measured faster on AMD Zen 5, slower on Intel (see avx512.cpp).
bool prefers_row_streaming();

struct TiledWeights;  // tiled.h

struct Problem {
  const float* a;  // [M, K]
  int64_t m, k, n;
  const uint8_t* b;      // [N, K / block, block * bits / 8]
  const float* scales;   // [N, K / block]
  const uint8_t* zp;     // may be null
  int bits;              // 4 or 8
  int block;             // power of two, 16..256, divides K
  float* y;              // [M, N]
  bool batched = true;   // the batched GEMV where it applies (NEOEDGE_KERNELS_BATCHED=0: off, to compare)
  bool stream_rows = false;  // one-row GEMV, one weight row at a time (NEOEDGE_KERNELS_STREAM_ROWS=0/1 forces)
  // B and scales in the tiled layout (tiled.h; the AVX-512 VNNI path only, without zero points):
  // each tile rearranged on first use. Null: MatMulNBits' layout.
  const TiledWeights* tiled = nullptr;

  int64_t blocks() const { return k / block; }
  int64_t row_bytes() const { return k * bits / 8; }
  int64_t zp_row_bytes() const { return bits == 8 ? blocks() : (blocks() + 1) / 2; }
  // The zero point of (n, b), implicit mid-range one when there is no zero-point input.
  int zero_point(int64_t n, int64_t b) const {
    if (!zp) return 1 << (bits - 1);
    const uint8_t* row = zp + n * zp_row_bytes();
    if (bits == 8) return row[b];
    return (row[b >> 1] >> ((b & 1) * 4)) & 0x0F;
  }
};

// Runs fn(user, i) for every i in [0, total) on the caller's thread pool, returning false on failure.
struct Parallel {
  bool (*run)(const void* context, void (*fn)(void*, size_t), size_t total, void* user);
  const void* context;
  bool operator()(void (*fn)(void*, size_t), size_t total, void* user) const {
    return run(context, fn, total, user);
  }
};

// Quantizes one block of activations as MLAS does; returns the int8 sum of the block.
inline int32_t quantize_block(const float* a, int len, int8_t* q, float* scale);

bool run_portable(const Problem& p, const Parallel& parallel);
bool run_neon(const Problem& p, const Parallel& parallel);
bool run_avx2(const Problem& p, const Parallel& parallel, bool vnni);
bool run_avx512(const Problem& p, const Parallel& parallel, bool amx);

// The path's entry point; false if the pool failed.
bool run(const Problem& p, const Parallel& parallel, Isa isa);

}  // namespace neoedge

#include <cmath>

namespace neoedge {

inline int32_t quantize_block(const float* a, int len, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int i = 0; i < len; ++i) amax = std::fmax(amax, std::fabs(a[i]));
  *scale = amax / 127.f;
  const float inverse = amax != 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int i = 0; i < len; ++i) {
    // nearbyint rounds half to even in the default rounding mode, as cvtps2dq does in MLAS.
    const int v = static_cast<int>(std::nearbyint(a[i] * inverse));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  return sum;
}

}  // namespace neoedge
