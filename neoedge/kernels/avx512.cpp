// AVX-512 VNNI paths: the decode GEMV (M small) and the prompt GEMM (M larger), plus the pieces the
// AMX GEMM shares (activation layout, accumulator set-up and write-out, 4-bit unpacking).
//
// GEMV: streams each weight row once, in MatMulNBits' layout. A zmm of packed 4-bit weights holds 128
// values; its low nibbles are the even k and its high nibbles the odd k, so the activations are
// stored de-interleaved per 128 k (64 even, then 64 odd) and vpdpbusd multiplies the unsigned nibbles
// with them directly: no shuffles of the weights. The zero-point term zp * a_scale * sum q of a
// block is folded into its epilogue (implicit zero points) or applied once per row for all blocks.
//
// GEMM: per task, 64 weight rows (two 32-row tiles, the AMX path's layout) are staged in VNNI order
// (for each 4 k, the 4 bytes of every row side by side; 4-bit values unpacked) in a buffer that stays
// in L1/L2 for all activation rows, which are quantized once per call in k order. vpdpbusd takes a
// vector of staged weights as the unsigned operand and broadcasts 4 bytes of an activation row, 6
// rows x 4 vectors at a time; block scales are applied per k-block in fp32 into contiguous tiles of
// accumulators, copied to Y once.
#include "avx512_blocks.h"
#include "tiled.h"

#if NEO_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace neoedge {
namespace x86 {

namespace {

// ---------------------------------------------------------------------------------------------
// GEMV: M small

// Activations of up to kMaxGemvRows rows in the GEMV layout.
struct GemvActivations {
  const int8_t* q;         // [rows, kp]; 4-bit: de-interleaved per 128 k
  const float* scale;      // [rows, blocks_pad]
  const float* scaled_sum; // [rows, blocks_pad]
  const float* lane_scale; // [rows, groups, 16] when a block is smaller than a vector's k span
  // Without zero-point inputs (zp = 2^(bits-1) everywhere) the correction zp * a_scale * sum q of
  // each block is folded into its epilogue: [rows, units, 16], one vector per block (or per group
  // of blocks sharing a vector), the block's correction in the first lane of its lanes.
  const float* correction;
  int64_t kp, blocks_pad, groups, units;
};

constexpr int kMaxGemvRows = 4;

// k covered by one zmm of weights.
constexpr int span_of(int bits) { return bits == 4 ? 128 : 64; }

// One row into the GEMV layout; `natural` is scratch of kp bytes.
NEO_AVX512 void quantize_gemv_row(const Problem& p, const float* a, int8_t* q, int8_t* natural, float* scale,
                                  float* scaled_sum, float* lane_scale, float* correction, int64_t kp,
                                  int64_t groups) {
  const int64_t blocks = p.blocks();
  const int block = p.block;
  int8_t* dst = p.bits == 8 ? q : natural;
  for (int64_t b = 0; b < blocks; ++b) {
    const QuantizedBlock r = quantize_block_avx512(a + b * block, block, dst + b * block);
    scale[b] = r.scale;
    scaled_sum[b] = r.scale * static_cast<float>(r.sum);
  }
  std::memset(dst + p.k, 0, static_cast<size_t>(kp - p.k));
  if (p.bits == 4) {
    // Per 128 k: the 64 even k, then the 64 odd k, matching the low and high nibbles of 64 bytes.
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i x0 = _mm512_loadu_si512(natural + g * 128), x1 = _mm512_loadu_si512(natural + g * 128 + 64);
      int8_t* out = q + g * 128;
      _mm256_storeu_si256((__m256i*)out, _mm512_cvtepi16_epi8(x0));
      _mm256_storeu_si256((__m256i*)(out + 32), _mm512_cvtepi16_epi8(x1));
      _mm256_storeu_si256((__m256i*)(out + 64), _mm512_cvtepi16_epi8(_mm512_srli_epi16(x0, 8)));
      _mm256_storeu_si256((__m256i*)(out + 96), _mm512_cvtepi16_epi8(_mm512_srli_epi16(x1, 8)));
    }
  }
  const int64_t blocks_pad = round_up(blocks, 16);
  for (int64_t b = blocks; b < blocks_pad; ++b) scale[b] = scaled_sum[b] = 0.f;
  const int span = span_of(p.bits);
  const float zp = static_cast<float>(1 << (p.bits - 1));
  if (block < span) {
    const int lanes_per_block = 16 * block / span;
    const int blocks_per_group = span / block;
    for (int64_t g = 0; g < groups; ++g) {
      for (int i = 0; i < 16; ++i) {
        const int64_t b = g * blocks_per_group + i / lanes_per_block;
        lane_scale[g * 16 + i] = b < blocks ? scale[b] : 0.f;
        if (!p.zp) correction[g * 16 + i] = b < blocks && i % lanes_per_block == 0 ? zp * scaled_sum[b] : 0.f;
      }
    }
  } else if (!p.zp) {
    for (int64_t b = 0; b < blocks; ++b) {
      _mm512_storeu_ps(correction + b * 16, _mm512_setzero_ps());
      correction[b * 16] = zp * scaled_sum[b];
    }
  }
}

// Zero points of one row as floats, blocks [b0, b0 + 16).
NEO_AVX512 NEO_INLINE __m512 zero_points16(const Problem& p, int64_t n, int64_t b0, int count) {
  const __mmask16 valid = static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1);
  if (!p.zp) return _mm512_set1_ps(static_cast<float>(1 << (p.bits - 1)));
  const uint8_t* row = p.zp + n * p.zp_row_bytes();
  __m512i z;
  if (p.bits == 8) {
    z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, row + b0));
  } else {
    // b0 is a multiple of 16: 8 bytes hold its 16 nibbles, low nibble first.
    const __mmask16 bytes = static_cast<__mmask16>((1u << ((std::min(count, 16) + 1) / 2)) - 1);
    const __m128i packed = _mm_maskz_loadu_epi8(bytes, row + b0 / 2);
    const __m128i words = _mm_cvtepu8_epi16(packed);  // 8 bytes -> 8 words
    const __m128i nibbles = _mm_and_si128(_mm_or_si128(words, _mm_slli_epi16(words, 4)), _mm_set1_epi16(0x0F0F));
    z = _mm512_cvtepu8_epi32(nibbles);
  }
  return _mm512_cvtepi32_ps(z);
}

// Accumulates one zmm of weights (group g) of NR rows against MR activation rows into sums.
template <int BITS, int MR, int NR>
NEO_AVX512 NEO_INLINE void group_dot(const uint8_t* const (&w)[NR], const int8_t* const (&q)[MR], int64_t g,
                                     __mmask64 mask, int64_t ahead, __m512i (&sums)[MR][NR]) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int r = 0; r < NR; ++r) {
    const uint8_t* src = w[r] + g * 64;
    // The rows of a tile are adjacent in memory and the next tile follows them: fetch the same
    // place in the next tile, so the stream stays ahead across row boundaries.
    _mm_prefetch(reinterpret_cast<const char*>(src) + ahead, _MM_HINT_T0);
    const __m512i bytes = _mm512_maskz_loadu_epi8(mask, src);
    if (BITS == 4) {
      const __m512i lo = _mm512_and_si512(bytes, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
      for (int m = 0; m < MR; ++m) {
        sums[m][r] = _mm512_dpbusd_epi32(sums[m][r], lo, _mm512_loadu_si512(q[m] + g * 128));
        sums[m][r] = _mm512_dpbusd_epi32(sums[m][r], hi, _mm512_loadu_si512(q[m] + g * 128 + 64));
      }
    } else {
      for (int m = 0; m < MR; ++m)
        sums[m][r] = _mm512_dpbusd_epi32(sums[m][r], bytes, _mm512_loadu_si512(q[m] + g * 64));
    }
  }
}

// y[0..NR) = horizontal sums of v[0..NR), NR a multiple of 4 or 1.
template <int NR>
NEO_AVX512 NEO_INLINE void store_sums(const __m512 (&v)[NR], float* y) {
  if constexpr (NR % 4 != 0) {
    for (int r = 0; r < NR; ++r) y[r] = _mm512_reduce_add_ps(v[r]);
  } else {
    for (int r = 0; r < NR; r += 4) {
      __m256 h[4];
      for (int i = 0; i < 4; ++i)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[r + i]), _mm512_extractf32x8_ps(v[r + i], 1));
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      _mm_storeu_ps(y + r, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    }
  }
}

// Bytes ahead of a lone row's stream at which it is prefetched (see gemv_rows).
constexpr int64_t kStreamAhead = 2048;

template <int BITS, int MR, int NR>
NEO_AVX512 void gemv_tile(const Problem& p, const GemvActivations& act, int64_t m0, int64_t n0) {
  constexpr int span = span_of(BITS);
  const int64_t blocks = p.blocks(), row_bytes = p.row_bytes();
  const int block = p.block;
  const bool folded = !p.zp;
  const uint8_t* w[NR];
  for (int r = 0; r < NR; ++r) w[r] = p.b + (n0 + r) * row_bytes;
  const int8_t* q[MR];
  for (int m = 0; m < MR; ++m) q[m] = act.q + (m0 + m) * act.kp;
  const int64_t ahead = p.stream_rows && NR == 1 ? kStreamAhead
                       : row_bytes >= 2048 ? 1024 : std::max<int64_t>(NR * row_bytes, 512);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  if (block >= span) {
    const int64_t per_block = block / span;
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i sums[MR][NR];
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) sums[m][r] = _mm512_setzero_si512();
      for (int64_t j = 0; j < per_block; ++j) group_dot<BITS, MR, NR>(w, q, b * per_block + j, ~0ull, ahead, sums);
      for (int m = 0; m < MR; ++m) {
        const __m512 a_scale = _mm512_set1_ps(act.scale[(m0 + m) * act.blocks_pad + b]);
        const __m512 correction = folded ? _mm512_loadu_ps(act.correction + ((m0 + m) * act.units + b) * 16)
                                         : _mm512_setzero_ps();
        for (int r = 0; r < NR; ++r) {
          const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sums[m][r]), a_scale, correction);
          acc[m][r] = _mm512_fmadd_ps(t, _mm512_set1_ps(p.scales[(n0 + r) * blocks + b]), acc[m][r]);
        }
      }
    }
  } else {
    // Several blocks per zmm: each dword lane belongs to one block; scales are spread over lanes.
    const int blocks_per_group = span / block, lanes_per_block = 16 * block / span;
    const __m512i spread = _mm512_srli_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), lanes_per_block == 2 ? 1 : lanes_per_block == 4 ? 2 : 3);
    const int64_t full_bytes = p.k * BITS / 8;
    for (int64_t g = 0; g < act.groups; ++g) {
      const int64_t left = full_bytes - g * 64;
      const __mmask64 mask = left >= 64 ? ~0ull : (1ull << left) - 1;
      __m512i sums[MR][NR];
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) sums[m][r] = _mm512_setzero_si512();
      group_dot<BITS, MR, NR>(w, q, g, mask, ahead, sums);
      const int64_t b0 = g * blocks_per_group;
      const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(blocks_per_group, blocks - b0)) - 1);
      __m512 w_scale[NR];
      for (int r = 0; r < NR; ++r)
        w_scale[r] = _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(valid, p.scales + (n0 + r) * blocks + b0));
      for (int m = 0; m < MR; ++m) {
        const __m512 a_scale = _mm512_loadu_ps(act.lane_scale + ((m0 + m) * act.groups + g) * 16);
        const __m512 correction = folded ? _mm512_loadu_ps(act.correction + ((m0 + m) * act.units + g) * 16)
                                         : _mm512_setzero_ps();
        for (int r = 0; r < NR; ++r) {
          const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sums[m][r]), a_scale, correction);
          acc[m][r] = _mm512_fmadd_ps(t, w_scale[r], acc[m][r]);
        }
      }
    }
  }
  if (!folded) {
    // Zero points: sum_b zp * w_scale * (a_scale * sum q), 16 blocks per vector.
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const __mmask16 valid = static_cast<__mmask16>(blocks - b0 >= 16 ? 0xFFFF : (1u << (blocks - b0)) - 1);
      for (int r = 0; r < NR; ++r) {
        const __m512 zw = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, p.scales + (n0 + r) * blocks + b0),
                                        zero_points16(p, n0 + r, b0, static_cast<int>(blocks - b0)));
        for (int m = 0; m < MR; ++m)
          acc[m][r] = _mm512_fnmadd_ps(zw, _mm512_loadu_ps(act.scaled_sum + (m0 + m) * act.blocks_pad + b0), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) store_sums<NR>(acc[m], p.y + (m0 + m) * p.n + n0);
}

struct GemvJob {
  const Problem* p;
  GemvActivations act;
  int64_t rows_per_task;
};

template <int BITS, int MR>
NEO_AVX512 void gemv_rows(const Problem& p, const GemvActivations& act, int64_t m0, int64_t n0, int64_t n1) {
  // One activation row: 8 weight rows (8 independent chains, 8 prefetch streams; measured better
  // than 4 on L2/L3-resident weights). More rows share each weight vector, with fewer weight rows
  // so that sums and accumulators stay in the 32 zmm registers.
  //
  // One activation row on AMD (p.stream_rows): one weight row at a time, so that each thread reads
  // one sequential stream. On Zen 5 (2 threads) the 1.3B's decode took ~15% less time than with 8
  // rows side by side when the VM's memory was slow (24-28 against 28-32 ms a token, interleaved
  // rounds) and the same when it was fast (~19.5 ms); rows one at a time were slower on the Intel
  // Xeon this was first tuned on.
  constexpr int NR = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  int64_t n = n0;
  if (MR == 1 && p.stream_rows) {
    for (; n < n1; ++n) gemv_tile<BITS, MR, 1>(p, act, m0, n);
    return;
  }
  for (; n + NR <= n1; n += NR) gemv_tile<BITS, MR, NR>(p, act, m0, n);
  for (; n < n1; ++n) gemv_tile<BITS, MR, 1>(p, act, m0, n);
}

template <int BITS>
NEO_AVX512 void gemv_task_bits(const GemvJob& job, int64_t n0, int64_t n1) {
  const Problem& p = *job.p;
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxGemvRows) {
    switch (std::min<int64_t>(kMaxGemvRows, p.m - m0)) {
      case 1: gemv_rows<BITS, 1>(p, job.act, m0, n0, n1); break;
      case 2: gemv_rows<BITS, 2>(p, job.act, m0, n0, n1); break;
      case 3: gemv_rows<BITS, 3>(p, job.act, m0, n0, n1); break;
      default: gemv_rows<BITS, 4>(p, job.act, m0, n0, n1); break;
    }
  }
}

void gemv_task(void* user, size_t task) {
  const GemvJob& job = *static_cast<const GemvJob*>(user);
  const int64_t n0 = static_cast<int64_t>(task) * job.rows_per_task;
  const int64_t n1 = std::min(job.p->n, n0 + job.rows_per_task);
  if (job.p->bits == 4) gemv_task_bits<4>(job, n0, n1);
  else gemv_task_bits<8>(job, n0, n1);
}

NEO_AVX512 bool run_gemv(const Problem& p, const Parallel& parallel) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;
  const int span = span_of(p.bits);
  const int64_t kp = round_up(p.k, span), groups = kp / span, blocks_pad = round_up(p.blocks(), 16);
  const int64_t units = p.block >= span ? p.blocks() : groups;
  GemvActivations act;
  int8_t* qd = grow(q, static_cast<size_t>(p.m * kp));
  float* sd = grow(scales, static_cast<size_t>(p.m * (2 * blocks_pad + groups * 16 + units * 16)));
  act.q = qd;
  act.scale = sd;
  act.scaled_sum = sd + p.m * blocks_pad;
  act.lane_scale = sd + 2 * p.m * blocks_pad;
  act.kp = kp;
  act.blocks_pad = blocks_pad;
  act.groups = groups;
  act.units = units;
  float* correction = sd + p.m * (2 * blocks_pad + groups * 16);
  act.correction = correction;
  thread_local std::vector<int8_t> natural;
  int8_t* nd = grow(natural, static_cast<size_t>(kp));
  for (int64_t m = 0; m < p.m; ++m) {
    quantize_gemv_row(p, p.a + m * p.k, qd + m * kp, nd, sd + m * blocks_pad, sd + (p.m + m) * blocks_pad,
                      sd + 2 * p.m * blocks_pad + m * groups * 16, correction + m * units * 16, kp, groups);
  }
  // Tasks of ~32 KB of weights: small enough to balance over the pool, large enough that the
  // per-task cost of the pool stays negligible; a multiple of 8 rows for the 8-row tiles.
  const int64_t rows = std::max<int64_t>(8, (32768 / std::max<int64_t>(1, p.row_bytes())) / 8 * 8);
  GemvJob job{&p, act, rows};
  return parallel(gemv_task, static_cast<size_t>((p.n + rows - 1) / rows), &job);
}

// ---------------------------------------------------------------------------------------------
// GEMM: M larger

struct PrepareJob {
  const Problem* p;
  GemmActivations act;
};

NEO_AVX512 void prepare_rows(const PrepareJob& job, int64_t m0) {
  const Problem& p = *job.p;
  const GemmActivations& act = job.act;
  const int64_t blocks = p.blocks();
  for (int64_t m = m0; m < std::min(m0 + 16, act.m_pad); ++m) {
    int8_t* row = const_cast<int8_t*>(act.q) + m * act.stride;
    float* scale = const_cast<float*>(act.scale) + m * act.blocks_pad;
    float* scaled_sum = const_cast<float*>(act.scaled_sum) + m * act.blocks_pad;
    if (m >= p.m) {
      std::memset(row, 0, static_cast<size_t>(act.k64));
      std::memset(scale, 0, static_cast<size_t>(act.blocks_pad) * sizeof(float));
      std::memset(scaled_sum, 0, static_cast<size_t>(act.blocks_pad) * sizeof(float));
      continue;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const QuantizedBlock qb = quantize_block_avx512(p.a + m * p.k + b * p.block, p.block, row + b * p.block);
      scale[b] = qb.scale;
      scaled_sum[b] = qb.scale * static_cast<float>(qb.sum);
    }
    std::memset(row + p.k, 0, static_cast<size_t>(act.k64 - p.k));
    // Tiled 4-bit weights stage each dword's even k, then its odd k (stage_tiled_group).
    if (p.tiled && p.bits == 4) split_even_odd(row, p.k);
  }
}

void prepare_task(void* user, size_t task) {
  const PrepareJob& job = *static_cast<const PrepareJob*>(user);
  prepare_rows(job, static_cast<int64_t>(task) * 16);
}


// 64 k of one weight row as bytes in k order (4-bit unpacked), zero past the row's end;
// minus its zero points when `centre` (4-bit only: w - zp fits int8).
NEO_AVX512 NEO_INLINE __m512i weight_chunk(const Problem& p, int64_t n, int64_t k0, bool centre) {
  const uint8_t* row = p.b + n * p.row_bytes();
  const int64_t left = p.k - k0;
  __m512i v;
  if (p.bits == 8) {
    // Plain loads where the row has a whole vector left: with masked byte loads, staging the 125M's
    // weights for a 128-token prompt took 16.5% of the prefill's samples on Zen 5, with plain ones 10.7%.
    v = left >= 64 ? _mm512_loadu_si512(row + k0) : _mm512_maskz_loadu_epi8((1ull << left) - 1, row + k0);
  } else {
    const int64_t bytes = std::min<int64_t>(32, left / 2);
    const __m256i packed = bytes >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0 / 2))
                                       : _mm256_maskz_loadu_epi8((1u << bytes) - 1, row + k0 / 2);
    const __m512i x = _mm512_cvtepu8_epi16(packed);
    // Each byte -> a word (low nibble, high nibble): (x | x << 4) & 0x0F0F, bytes in k order.
    v = _mm512_ternarylogic_epi32(x, _mm512_slli_epi16(x, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
  }
  if (centre) {
    const int block = p.block;
    const int64_t b0 = k0 / block;
    __m512i zp = _mm512_set1_epi8(static_cast<char>(p.zero_point(n, b0)));
    for (int j = 1; j * block < 64 && k0 + j * block < p.k; ++j) {
      const __mmask64 part = (~0ull >> (64 - block)) << (j * block);
      zp = _mm512_mask_mov_epi8(zp, part, _mm512_set1_epi8(static_cast<char>(p.zero_point(n, b0 + j))));
    }
    v = _mm512_maskz_sub_epi8(left >= 64 ? ~0ull : (1ull << left) - 1, v, zp);
  }
  return v;
}

}  // namespace

namespace {

// Rows [first, first + 16) of a stage tile (group g) from MatMulNBits' layout; zero rows past N.
NEO_AVX512 void stage_plain_group(const Problem& p, int64_t first, int g, bool centre, uint8_t* out, float* w_scale,
                                  float* zp_scale) {
  const int64_t k64 = round_up(p.k, 64), blocks = p.blocks();
  for (int64_t k0 = 0; k0 < k64; k0 += 64) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t n = first + i;
      r[i] = n < p.n ? weight_chunk(p, n, k0, centre) : _mm512_setzero_si512();
    }
    if (k0 + 1024 < p.k && first < p.n)
      _mm_prefetch(reinterpret_cast<const char*>(p.b + first * p.row_bytes() + (k0 + 1024) * p.bits / 8), _MM_HINT_T0);
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + ((k0 / 4 + j) * kTileRows + g * 16) * 4, r[j]);
  }
  for (int i = g * 16; i < g * 16 + 16; ++i) {
    const int64_t n = first - g * 16 + i;
    for (int64_t b = 0; b < blocks; ++b) {
      const float ws = n < p.n ? p.scales[n * blocks + b] : 0.f;
      w_scale[b * kTileRows + i] = ws;
      if (zp_scale) zp_scale[b * kTileRows + i] = n < p.n ? ws * static_cast<float>(p.zero_point(n, b)) : 0.f;
    }
  }
}

}  // namespace

NEO_AVX512 void stage_tile(const Problem& p, int64_t n0, bool centre, uint8_t* out, float* w_scale, float* zp_scale) {
  for (int g = 0; g < kTileRows / 16; ++g) {
    const int64_t first = n0 + g * 16;
    if (p.tiled && first < p.n) {
      p.tiled->ensure(first / kTileHeight);
      stage_tiled_group(p, first, g, out, w_scale, zp_scale);
    } else {
      stage_plain_group(p, first, g, centre, out, w_scale, zp_scale);
    }
  }
}

NEO_AVX512 void init_outputs(const GemmActivations& act, int64_t blocks, int64_t m0, int64_t m1, const float* zp_scale,
                             float* acc) {
  for (int64_t m = m0; m < m1; ++m) {
    __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
    const float* ss = act.scaled_sum + m * act.blocks_pad;
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 s = _mm512_set1_ps(ss[b]);
      v0 = _mm512_fnmadd_ps(s, _mm512_loadu_ps(zp_scale + b * kTileRows), v0);
      v1 = _mm512_fnmadd_ps(s, _mm512_loadu_ps(zp_scale + b * kTileRows + 16), v1);
    }
    _mm512_storeu_ps(acc + (m - m0) * kTileRows, v0);
    _mm512_storeu_ps(acc + (m - m0) * kTileRows + 16, v1);
  }
}

NEO_AVX512 void store_outputs(const Problem& p, int64_t n0, int64_t m0, int64_t m1, const float* acc) {
  const int valid = static_cast<int>(std::min<int64_t>(kTileRows, p.n - n0));
  const __mmask16 lo = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  const __mmask16 hi = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
  for (int64_t m = m0; m < m1; ++m) {
    float* y = p.y + m * p.n + n0;
    store_lanes(y, lo, _mm512_loadu_ps(acc + (m - m0) * kTileRows));
    if (hi) store_lanes(y + 16, hi, _mm512_loadu_ps(acc + (m - m0) * kTileRows + 16));
  }
}

namespace {

// MR <= 6 activation rows x 64 weight rows (two staged 32-row tiles) over one k-block: the staged
// weights [k/4][32][4] are the unsigned operand, each row's 4 activation bytes are broadcast; the
// int32 sums go to `sums` [MR][64]. 6 x 4 vectors rather than 12 x 2: one broadcast per 4 vpdpbusd
// instead of per 2 (on Zen 5, 12 x 2 ran at 1.4-1.8 vpdpbusd a cycle and 6 x 4 at 2.0, its peak,
// L1-resident). The accumulators are named variables, not an array, and the scaling is done by the
// caller: with either an array of __m512i or the epilogue in this function, GCC 12 stores every
// accumulator to the stack in each iteration, which held the loop to 0.5-0.9 vpdpbusd a cycle.
template <int MR>
NEO_AVX512 void vnni_sums(const uint8_t* w_lo, const uint8_t* w_hi, const int8_t* x, int64_t x_stride,
                          int64_t kq_count, int32_t* sums) {
  static_assert(MR >= 1 && MR <= 6, "6 rows x 4 vectors fill the registers");
#define NEO_ZERO(r) [[maybe_unused]] __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, \
                    c##r##2 = c##r##0, c##r##3 = c##r##0;
  NEO_ZERO(0) NEO_ZERO(1) NEO_ZERO(2) NEO_ZERO(3) NEO_ZERO(4) NEO_ZERO(5)
#undef NEO_ZERO
  for (int64_t kq = 0; kq < kq_count; ++kq) {
    const __m512i w0 = _mm512_loadu_si512(w_lo + kq * 128), w1 = _mm512_loadu_si512(w_lo + kq * 128 + 64);
    const __m512i w2 = _mm512_loadu_si512(w_hi + kq * 128), w3 = _mm512_loadu_si512(w_hi + kq * 128 + 64);
#define NEO_ROW(r)                                                          \
  if constexpr (MR > r) {                                                   \
    const __m512i a = broadcast4(x + r * x_stride + kq * 4);                \
    dpbusd(c##r##0, w0, a);                                                 \
    dpbusd(c##r##1, w1, a);                                                 \
    dpbusd(c##r##2, w2, a);                                                 \
    dpbusd(c##r##3, w3, a);                                                 \
  }
    NEO_ROW(0) NEO_ROW(1) NEO_ROW(2) NEO_ROW(3) NEO_ROW(4) NEO_ROW(5)
#undef NEO_ROW
  }
#define NEO_OUT(r)                                                          \
  if constexpr (MR > r) {                                                   \
    _mm512_storeu_si512(sums + r * 64, c##r##0);                            \
    _mm512_storeu_si512(sums + r * 64 + 16, c##r##1);                       \
    _mm512_storeu_si512(sums + r * 64 + 32, c##r##2);                       \
    _mm512_storeu_si512(sums + r * 64 + 48, c##r##3);                       \
  }
  NEO_OUT(0) NEO_OUT(1) NEO_OUT(2) NEO_OUT(3) NEO_OUT(4) NEO_OUT(5)
#undef NEO_OUT
}

// acc += sums x a_scale x w_scale for `rows` rows of one k-block, each half of the 64 weight rows
// into its own 32-row accumulator tile.
NEO_AVX512 void scale_sums(const int32_t* sums, int rows, const float* a_scale, int64_t a_scale_stride,
                           const float* ws_lo, const float* ws_hi, float* acc_lo, float* acc_hi) {
  const __m512 ws[4] = {_mm512_loadu_ps(ws_lo), _mm512_loadu_ps(ws_lo + 16), _mm512_loadu_ps(ws_hi),
                        _mm512_loadu_ps(ws_hi + 16)};
  for (int r = 0; r < rows; ++r) {
    const __m512 as = _mm512_set1_ps(a_scale[r * a_scale_stride]);
    for (int j = 0; j < 4; ++j) {
      float* out = (j < 2 ? acc_lo : acc_hi) + r * kTileRows + (j % 2) * 16;
      const __m512 s = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums + r * 64 + j * 16));
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_mul_ps(s, as), ws[j], _mm512_loadu_ps(out)));
    }
  }
}

struct GemmJob {
  const Problem* p;
  GemmActivations act;
  int64_t n_tiles, m_chunks;
};

constexpr int kVnniRows = 6;
constexpr int kVnniTileRows = 2 * kTileRows;  // weight rows per VNNI GEMM task: two staged tiles

struct VnniTile {
  const uint8_t* staged[2];
  const float* w_scale[2];
  float* acc[2];
};

template <int MR>
NEO_AVX512 void vnni_rows(const Problem& p, const GemmActivations& act, const VnniTile& t, int64_t m, int64_t m0,
                          int64_t b) {
  const int64_t at = b * p.block * kTileRows;
  alignas(64) int32_t sums[kVnniRows * 64];
  vnni_sums<MR>(t.staged[0] + at, t.staged[1] + at, act.q + m * act.stride + b * p.block, act.stride, p.block / 4,
                sums);
  scale_sums(sums, MR, act.scale + m * act.blocks_pad + b, act.blocks_pad, t.w_scale[0] + b * kTileRows,
             t.w_scale[1] + b * kTileRows, t.acc[0] + (m - m0) * kTileRows, t.acc[1] + (m - m0) * kTileRows);
}

NEO_AVX512 void vnni_gemm_task(const GemmJob& job, int64_t tile, int64_t chunk) {
  const Problem& p = *job.p;
  const GemmActivations& act = job.act;
  const int64_t n0 = tile * kVnniTileRows, m0 = chunk * kMChunk, m1 = std::min(p.m, m0 + kMChunk);
  const int64_t blocks = p.blocks();
  const size_t staged_size = static_cast<size_t>(round_up(p.k, 64) * kTileRows);
  const size_t scale_size = static_cast<size_t>(2 * blocks * kTileRows), acc_size = static_cast<size_t>(kMChunk * kTileRows);
  thread_local std::vector<uint8_t> staged_buffer;
  thread_local std::vector<float> scale_buffer, acc_buffer;
  uint8_t* staged = grow(staged_buffer, 2 * staged_size);
  float* scales = grow(scale_buffer, 2 * scale_size);
  float* acc = grow(acc_buffer, 2 * acc_size);
  VnniTile t{};
  for (int h = 0; h < 2; ++h) {
    // Past N (the second half of the last tile): stage_tile writes zero weights and scales.
    float* w_scale = scales + h * scale_size;
    float* zp_scale = w_scale + blocks * kTileRows;
    stage_tile(p, n0 + h * kTileRows, false, staged + h * staged_size, w_scale, zp_scale);
    init_outputs(act, blocks, m0, m1, zp_scale, acc + h * acc_size);
    t.staged[h] = staged + h * staged_size;
    t.w_scale[h] = w_scale;
    t.acc[h] = acc + h * acc_size;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t m = m0;
    for (; m + kVnniRows <= m1; m += kVnniRows) vnni_rows<kVnniRows>(p, act, t, m, m0, b);
    switch (m1 - m) {
      case 5: vnni_rows<5>(p, act, t, m, m0, b); break;
      case 4: vnni_rows<4>(p, act, t, m, m0, b); break;
      case 3: vnni_rows<3>(p, act, t, m, m0, b); break;
      case 2: vnni_rows<2>(p, act, t, m, m0, b); break;
      case 1: vnni_rows<1>(p, act, t, m, m0, b); break;
      default: break;
    }
  }
  store_outputs(p, n0, m0, m1, t.acc[0]);
  if (n0 + kTileRows < p.n) store_outputs(p, n0 + kTileRows, m0, m1, t.acc[1]);
}

void gemm_task(void* user, size_t task) {
  const GemmJob& job = *static_cast<const GemmJob*>(user);
  vnni_gemm_task(job, static_cast<int64_t>(task) / job.m_chunks, static_cast<int64_t>(task) % job.m_chunks);
}

NEO_AVX512 bool prepare(const Problem& p, const Parallel& parallel, GemmActivations* out) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;
  const int64_t m_pad = round_up(p.m, 16), k64 = round_up(p.k, 64), blocks_pad = round_up(p.blocks(), 16);
  GemmActivations act;
  act.stride = k64 + 64;
  act.q = grow(q, static_cast<size_t>(m_pad * act.stride));
  float* sd = grow(scales, static_cast<size_t>(2 * m_pad * blocks_pad));
  act.scale = sd;
  act.scaled_sum = sd + m_pad * blocks_pad;
  act.m_pad = m_pad;
  act.k64 = k64;
  act.blocks_pad = blocks_pad;
  PrepareJob job{&p, act};
  if (!parallel(prepare_task, static_cast<size_t>(m_pad / 16), &job)) return false;
  *out = act;
  return true;
}

NEO_AVX512 bool run_gemm(const Problem& p, const Parallel& parallel) {
  GemmActivations act;
  if (!prepare(p, parallel, &act)) return false;
  const int64_t n_tiles = (p.n + kVnniTileRows - 1) / kVnniTileRows, m_chunks = (p.m + kMChunk - 1) / kMChunk;
  GemmJob job{&p, act, n_tiles, m_chunks};
  return parallel(gemm_task, static_cast<size_t>(n_tiles * m_chunks), &job);
}

}  // namespace

bool prepare_gemm_activations(const Problem& p, const Parallel& parallel, GemmActivations* out) {
  return prepare(p, parallel, out);
}

}  // namespace x86

// Rows at which the batched GEMV (avx512_batch.cpp: 16 weight rows per vector, weights transposed
// per block) takes over from the GEMV (one pass of the weights for up to 3 rows), and below which
// the GEMV's 4-row passes beat staging the weights for the GEMM. Measured with
// benchmarks/batch_decode.py (a whole batched decode step, 125M int4, 2 threads): at 2 rows the
// GEMV was faster, at 4-16 the batched GEMV (batch 8: 9.6-12.0 ms a step against 14.3-17.0).
constexpr int64_t kBatchMinRows = 4;
constexpr int64_t kGemmMinRows = 12;

bool run_avx512(const Problem& p, const Parallel& parallel, bool amx) {
  if (p.tiled) return p.m <= x86::kMaxBatchRows ? x86::tiled_gemv(p, parallel) : x86::run_gemm(p, parallel);
  if (p.batched && p.m >= kBatchMinRows && p.m <= x86::kMaxBatchRows && x86::batch_gemv_applies(p))
    return x86::batch_gemv(p, parallel, amx);
  if (p.m < kGemmMinRows) return x86::run_gemv(p, parallel);
  if (!amx) return x86::run_gemm(p, parallel);
  x86::GemmActivations act;
  if (!x86::prepare_gemm_activations(p, parallel, &act)) return false;
  return x86::amx_gemm(p, parallel, act);
}

}  // namespace neoedge

#endif
