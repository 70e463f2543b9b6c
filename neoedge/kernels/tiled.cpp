// The rearrangement of B and scales into the tiled layout, tile by tile on first use (tiled.h).
#include "tiled.h"

#include "x86.h"

#if NEO_X86
#include "avx512_blocks.h"
#endif

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace neoedge {

namespace {

// Writes (the same value) to one byte in every page of [begin, end), before anything reads there.
// onnxruntime maps the weights file privately: a page first read is mapped read-only, and the
// rearrangement's write then copies it and flushes that mapping from every core's TLB. On a VM
// each flush is an interrupt to the other core (a 1.3B's first prefill took 2.9 s instead of 0.8,
// ~35% of it in TLB shootdowns, perf). A page first written is copied at once, with no flush.
// Measured no better on the 1.3B: MADV_POPULATE_WRITE per tile instead; and tiles in anonymous
// memory of their own on 2 MB pages (the file's pages released after), slower on this VM, where
// the first touch of a huge page ran at 0.4-0.7 GB/s.
void touch_for_writing(uint8_t* begin, uint8_t* end) {
#if defined(__GNUC__)
  constexpr uintptr_t kPage = 4096;
  for (uint8_t* p = begin; p < end; p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) | (kPage - 1)) + 1))
    __atomic_fetch_or(p, static_cast<uint8_t>(0), __ATOMIC_RELAXED);
#else
  (void)begin, (void)end;
#endif
}

// Rows [0, h) of a [h, width] array of 4-byte elements at `from` into the tiled order at `to`
// (element d of row r at (d h + r)): byte copies of 4, as onnxruntime's initializers need not be
// 4-byte aligned (external-data offsets).
void tile_scalar(const uint8_t* from, int64_t h, int64_t width, int64_t d0, uint8_t* to) {
  for (int64_t d = d0; d < width; ++d)
    for (int64_t r = 0; r < h; ++r) std::memcpy(to + (d * h + r) * 4, from + (r * width + d) * 4, 4);
}

#if NEO_X86
// Full tiles, 16 elements of every row at a time, by a 16 x 16 transpose: with a copy per dword
// the 1.3B's cold start was 4% longer (1.28 against 1.19 s, paired; the rest of what tiling adds
// to it is the kernel copying each page it is written to, see touch_for_writing).
NEO_AVX512 void tile_avx512(const uint8_t* from, int64_t width, uint8_t* to) {
  static_assert(kTileHeight == 16, "a tile's rows are the 16 rows of one transpose");
  for (int64_t d = 0; d + 16 <= width; d += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(from + (i * width + d) * 4);
    x86::transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(to + (d + j) * kTileHeight * 4, r[j]);
  }
}
#endif

void tile(const uint8_t* from, int64_t h, int64_t width, uint8_t* to) {
  int64_t done = 0;
#if NEO_X86
  // Only the AVX-512 VNNI path tiles weights (op.cpp), so this CPU runs AVX-512.
  if (h == kTileHeight) {
    tile_avx512(from, width, to);
    done = width / 16 * 16;
  }
#endif
  tile_scalar(from, h, width, done, to);
}

// Tile rows [n0, n0 + h) of a [N, width] array of 4-byte elements, in place (through scratch).
void tile_rows(uint8_t* data, int64_t n0, int64_t h, int64_t width, uint8_t* scratch) {
  uint8_t* tile_start = data + n0 * width * 4;
  touch_for_writing(tile_start, tile_start + h * width * 4);
  std::memcpy(scratch, tile_start, static_cast<size_t>(h * width * 4));
  tile(scratch, h, width, tile_start);
}

}  // namespace

void TiledWeights::ensure(int64_t t) const {
  std::atomic<uint8_t>& state = states[t];
  if (state.load(std::memory_order_acquire) == kTiled) return;
  const int64_t dwords = k * bits / 8 / 4, blocks = k / block;
  // Scratch first: a failed allocation must not leave the tile claimed (its readers would wait).
  thread_local std::vector<uint8_t> scratch;
  const size_t bytes = static_cast<size_t>(kTileHeight * std::max(dwords, blocks) * 4);
  if (scratch.size() < bytes) scratch.resize(bytes);
  uint8_t expected = kPlain;
  if (state.compare_exchange_strong(expected, kTiling, std::memory_order_acquire)) {
    const int64_t n0 = t * kTileHeight, h = std::min<int64_t>(kTileHeight, n - n0);
    tile_rows(b, n0, h, dwords, scratch.data());
    tile_rows(reinterpret_cast<uint8_t*>(scales), n0, h, blocks, scratch.data());
    state.store(kTiled, std::memory_order_release);
    return;
  }
  // Another thread (a concurrent run of the same session) is rearranging this tile: microseconds.
  while (state.load(std::memory_order_acquire) != kTiled) std::this_thread::yield();
}

void dequantize_row(const uint8_t* b, int64_t n, int64_t k, int bits, int block, bool tiled, int64_t row,
                    const float* scale, const uint8_t* zp, float* out) {
  const int64_t row_bytes = k * bits / 8;
  const int64_t t = row / kTileHeight, r = row % kTileHeight, h = std::min<int64_t>(kTileHeight, n - t * kTileHeight);
  const uint8_t* tile = b + t * kTileHeight * row_bytes;
  for (int64_t d = 0; d < row_bytes / 4; ++d) {
    const uint8_t* word = tiled ? tile + (d * h + r) * 4 : b + row * row_bytes + d * 4;
    for (int j = 0; j < 4; ++j) {
      const int64_t i = (d * 4 + j) * 8 / bits;  // first k of this byte
      const int64_t c = i / block;
      const float s = scale[c];
      if (bits == 8) {
        out[i] = static_cast<float>(static_cast<int>(word[j]) - (zp ? zp[c] : 128)) * s;
      } else {
        out[i] = static_cast<float>(static_cast<int>(word[j] & 15) - 8) * s;
        out[i + 1] = static_cast<float>(static_cast<int>(word[j] >> 4) - 8) * s;
      }
    }
  }
}

}  // namespace neoedge
