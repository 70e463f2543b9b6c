// The one-time rearrangement of B and scales into the tiled layout (tiled.h). Plain C++: it runs
// once per weight when a session is created, at memory speed on the rows it copies.
#include "tiled.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace neoedge {

namespace {

// Tile rows [n0, n0 + h) of a [N, width] array of 4-byte elements, copied to scratch first. Byte
// copies of 4: onnxruntime's initializers need not be 4-byte aligned (external-data offsets).
void tile_rows(uint8_t* data, int64_t n0, int64_t h, int64_t width, uint8_t* scratch) {
  uint8_t* tile = data + n0 * width * 4;
  std::memcpy(scratch, tile, static_cast<size_t>(h * width * 4));
  for (int64_t d = 0; d < width; ++d)
    for (int64_t r = 0; r < h; ++r) std::memcpy(tile + (d * h + r) * 4, scratch + (r * width + d) * 4, 4);
}

}  // namespace

void tile_weights(uint8_t* b, float* scales, int64_t n, int64_t k, int bits, int block) {
  const int64_t dwords = k * bits / 8 / 4, blocks = k / block, tiles = (n + kTileHeight - 1) / kTileHeight;
  const size_t scratch_bytes = static_cast<size_t>(kTileHeight * std::max(dwords, blocks) * 4);
  auto run = [=](int64_t t0, int64_t t1) {
    std::vector<uint8_t> scratch(scratch_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileHeight, h = std::min<int64_t>(kTileHeight, n - n0);
      tile_rows(b, n0, h, dwords, scratch.data());
      tile_rows(reinterpret_cast<uint8_t*>(scales), n0, h, blocks, scratch.data());
    }
  };
  // The session is being created (no pool to borrow): a 1.3B model's 700 MB are rearranged by
  // threads of their own, each copying its share once, so that the cold start pays ~memory speed.
  const int64_t bytes = n * dwords * 4;
  const int64_t workers = bytes < (16 << 20) ? 1 : std::max<int64_t>(1, std::min<int64_t>(4, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  const int64_t per = (tiles + workers - 1) / workers;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, std::min(tiles, w * per), std::min(tiles, (w + 1) * per));
  run(0, std::min(tiles, per));
  for (auto& thread : threads) thread.join();
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
