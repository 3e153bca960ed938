#include "guestmem/chunk_cache.h"

namespace guestmem {

Result<ChunkCache::Chunk> ChunkCache::Get(const ChunkHash& hash, const Loader& load) {
  std::unique_lock lock(mu_);
  if (auto it = slots_.find(hash); it != slots_.end()) {
    Slot& slot = it->second;
    if (slot.chunk != nullptr) {
      lru_.splice(lru_.begin(), lru_, slot.lru);
      hits_.fetch_add(1, std::memory_order_relaxed);
      return slot.chunk;
    }
    std::shared_future<Result<Chunk>> loading = slot.loading;
    lock.unlock();
    hits_.fetch_add(1, std::memory_order_relaxed);
    return loading.get();
  }
  misses_.fetch_add(1, std::memory_order_relaxed);
  std::promise<Result<Chunk>> promise;
  slots_[hash].loading = promise.get_future().share();
  lock.unlock();

  Result<Chunk> loaded = load();

  lock.lock();
  auto it = slots_.find(hash);
  if (loaded) {
    Slot& slot = it->second;
    slot.chunk = *loaded;
    slot.loading = {};
    lru_.push_front(hash);
    slot.lru = lru_.begin();
    bytes_ += slot.chunk->bytes().size();
    EvictLocked();
  } else {
    slots_.erase(it);
  }
  lock.unlock();
  promise.set_value(loaded);
  return loaded;
}

bool ChunkCache::Contains(const ChunkHash& hash) const {
  std::lock_guard lock(mu_);
  auto it = slots_.find(hash);
  return it != slots_.end() && it->second.chunk != nullptr;
}

uint64_t ChunkCache::bytes() const {
  std::lock_guard lock(mu_);
  return bytes_;
}

void ChunkCache::EvictLocked() {
  // The newest chunk stays even when it alone exceeds the capacity: its caller is using it.
  while (bytes_ > capacity_ && lru_.size() > 1) {
    auto it = slots_.find(lru_.back());
    bytes_ -= it->second.chunk->bytes().size();
    slots_.erase(it);
    lru_.pop_back();
  }
}

}  // namespace guestmem
