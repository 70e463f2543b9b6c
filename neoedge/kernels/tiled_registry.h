// Which initializers' memory neoedge's kernels may rearrange into the tiled layout (tiled.h),
// process-wide, keyed by data pointer.
//
// Every kernel that reads a constant initializer says how: a tiling MatMulNBits joins its B and
// scales (join_tiled), any other reader of MatMulNBits' layout pins them (pin_plain). A pinned
// initializer is never rearranged, and the kernels that joined it read it as it is: two nodes that
// share weights then agree whatever their order of creation. onnxruntime creates every kernel of a
// session before its first run and rearranging is lazy (tiled.h), so a pin always comes in time
// within a session; a pin after a tile was rearranged (an initializer shared across sessions) is
// refused. Registrations last as long as their kernel: a later session may reuse the addresses.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "tiled.h"

namespace neoedge {

struct TiledShared {
  TiledWeights weights{};  // weights.b null: only plain readers registered these pointers
  std::unique_ptr<std::atomic<uint8_t>[]> states;
  std::atomic<bool> pinned{false};
  bool stored = false;  // written tiled by the export (every tile starts tiled; never pinned)
};

// Registers B and scales (of this shape) for rearranging. Returns the shared state, whose weights
// the kernel reads tiled unless `pinned` (read it at each run); null if they must stay as they
// are (a plain reader or another shape already registered them; then they are pinned). Refused
// (false, with why) only if a tile was already rearranged. Either way release both pointers.
// `stored`: the initializers already hold the tiled layout (the package's tiled kernel graph, op
// MatMulNBitsTiled): every tile starts tiled, and any reader that would need them as they are is
// refused instead of pinning them.
bool join_tiled(uint8_t* b, float* scales, int64_t n, int64_t k, int64_t bits, int64_t block, bool stored,
                std::shared_ptr<TiledShared>* out, std::string* why);
// A reader of `pointer` in MatMulNBits' layout; false (with why) if some tile of it was rearranged.
bool pin_plain(const void* pointer, std::string* why);
void release_registration(const void* pointer);
// The registered state of a table's B (null if none); its rows are tiled if it is not pinned.
std::shared_ptr<TiledShared> find_tiled(const void* b);

}  // namespace neoedge
