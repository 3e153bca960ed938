// ChunkCache: decompressed chunks of packed snapshots, shared by every VM (and every layer)
// restored through it, bounded in memory.
//
// Chunks are keyed by their content hash, so a chunk that two layers or two snapshots share is
// decoded and kept once. However many threads ask for a chunk that is not in yet, it is loaded
// once: the first asks its loader, the others wait for that load. What is least recently used
// goes first when the decoded chunks exceed the capacity; a chunk still being read by a caller
// stays alive through its shared_ptr. A failed load is not kept: the next Get tries again.
//
// Thread safety: safe from many threads at once.
#ifndef GUESTMEM_CHUNK_CACHE_H_
#define GUESTMEM_CHUNK_CACHE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>

#include "guestmem/chunk_codec.h"
#include "guestmem/result.h"

namespace guestmem {

// A chunk's content, decompressed and checked against its hash.
class DecodedChunk {
 public:
  explicit DecodedChunk(size_t bytes)
      : data_(std::make_unique_for_overwrite<std::byte[]>(bytes)), size_(bytes) {}
  std::span<const std::byte> bytes() const { return {data_.get(), size_}; }
  std::span<std::byte> mutable_bytes() { return {data_.get(), size_}; }

 private:
  std::unique_ptr<std::byte[]> data_;
  size_t size_;
};

class ChunkCache {
 public:
  using Chunk = std::shared_ptr<const DecodedChunk>;
  using Loader = std::function<Result<Chunk>()>;

  explicit ChunkCache(uint64_t capacity_bytes) : capacity_(capacity_bytes) {}

  // The chunk named `hash`: the cached one, or what `load` returns (kept for the next caller).
  Result<Chunk> Get(const ChunkHash& hash, const Loader& load);
  bool Contains(const ChunkHash& hash) const;

  uint64_t capacity() const { return capacity_; }
  uint64_t bytes() const;
  uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t misses() const { return misses_.load(std::memory_order_relaxed); }

 private:
  struct HashOf {
    size_t operator()(const ChunkHash& h) const {
      size_t v = 0;
      for (size_t i = 0; i < sizeof(v); ++i) v = (v << 8) | h[i];
      return v;
    }
  };
  struct Slot {
    std::shared_future<Result<Chunk>> loading;  // valid until the load ends
    Chunk chunk;                                // once loaded
    std::list<ChunkHash>::iterator lru;
  };

  void EvictLocked();  // REQUIRES(mu_)

  const uint64_t capacity_;
  mutable std::mutex mu_;
  std::unordered_map<ChunkHash, Slot, HashOf> slots_;  // GUARDED_BY(mu_)
  std::list<ChunkHash> lru_;                            // GUARDED_BY(mu_): loaded, newest first
  uint64_t bytes_ = 0;                                  // GUARDED_BY(mu_)
  std::atomic<uint64_t> hits_{0}, misses_{0};
};

}  // namespace guestmem

#endif  // GUESTMEM_CHUNK_CACHE_H_
