// The registry of tiled_registry.h.
#include "tiled_registry.h"

#include <map>
#include <mutex>

namespace neoedge {

namespace {

struct Registration {
  std::shared_ptr<TiledShared> shared;
  int users;
};

std::mutex g_mutex;
std::map<const void*, Registration> g_registry;

bool any_tiled(const TiledShared& shared) {
  if (!shared.weights.b) return false;
  for (int64_t t = 0; t < shared.weights.tiles(); ++t)
    if (shared.states[t].load() != TiledWeights::kPlain) return true;
  return false;
}

// With the lock held.
bool pin_locked(const void* pointer, std::string* why) {
  auto it = g_registry.find(pointer);
  if (it == g_registry.end()) {
    auto placeholder = std::make_shared<TiledShared>();
    placeholder->pinned.store(true);
    g_registry.emplace(pointer, Registration{placeholder, 1});
    return true;
  }
  if (it->second.shared->stored) {
    *why = "an initializer stored in the tiled layout (the package's tiled kernel graph) is read in "
           "MatMulNBits' layout by another node";
    return false;
  }
  if (any_tiled(*it->second.shared)) {
    *why = "an initializer read in MatMulNBits' layout was already rearranged by another node's kernel";
    return false;
  }
  it->second.shared->pinned.store(true);
  ++it->second.users;
  return true;
}

void release_locked(const void* pointer) {
  auto it = g_registry.find(pointer);
  if (it != g_registry.end() && --it->second.users == 0) g_registry.erase(it);
}

}  // namespace

bool join_tiled(uint8_t* b, float* scales, int64_t n, int64_t k, int64_t bits, int64_t block, bool stored,
                std::shared_ptr<TiledShared>* out, std::string* why) {
  std::lock_guard<std::mutex> lock(g_mutex);
  out->reset();
  auto eb = g_registry.find(b), es = g_registry.find(scales);
  if (eb == g_registry.end() && es == g_registry.end()) {
    auto shared = std::make_shared<TiledShared>();
    shared->weights = TiledWeights{b, scales, n, k, bits, block, nullptr};
    const int64_t tiles = shared->weights.tiles();
    shared->states.reset(new std::atomic<uint8_t>[static_cast<size_t>(tiles)]);
    for (int64_t t = 0; t < tiles; ++t) shared->states[t].store(stored ? TiledWeights::kTiled : TiledWeights::kPlain);
    shared->weights.states = shared->states.get();
    shared->stored = stored;
    g_registry.emplace(b, Registration{shared, 1});
    g_registry.emplace(scales, Registration{shared, 1});
    *out = shared;
    return true;
  }
  if (eb != g_registry.end() && es != g_registry.end() && eb->second.shared == es->second.shared) {
    const TiledWeights& w = eb->second.shared->weights;
    if (w.b == b && w.scales == scales && w.n == n && w.k == k && w.bits == bits && w.block == block &&
        eb->second.shared->stored == stored) {
      ++eb->second.users;
      ++es->second.users;
      *out = eb->second.shared;  // read tiled unless pinned
      return true;
    }
  }
  if (stored) {
    *why = "B or scales stored in the tiled layout is read by another node in another way";
    return false;
  }
  // Shared with weights of another shape or with a plain reader: everyone reads them as they are.
  if (!pin_locked(b, why)) return false;
  if (!pin_locked(scales, why)) {
    release_locked(b);
    return false;
  }
  return true;
}

bool pin_plain(const void* pointer, std::string* why) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return pin_locked(pointer, why);
}

void release_registration(const void* pointer) {
  std::lock_guard<std::mutex> lock(g_mutex);
  release_locked(pointer);
}

std::shared_ptr<TiledShared> find_tiled(const void* b) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_registry.find(b);
  return it == g_registry.end() ? nullptr : it->second.shared;
}

}  // namespace neoedge
