#include "guestmem/disk_chunk_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <vector>

#include "guestmem/log.h"

namespace guestmem {
namespace {

// An entry used again is touched on disk no more often than this: what matters is the order
// across a restart, not to the second.
constexpr int64_t kTouchEverySeconds = 60;
// A temporary file older than this was left by a writer that crashed.
constexpr auto kStaleTemporary = std::chrono::minutes(10);

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<std::unique_ptr<DiskChunkCache>> DiskChunkCache::Open(const std::string& directory,
                                                             uint64_t max_bytes) {
  if (max_bytes == 0) {
    return Error(ErrorCode::kInvalidArgument, "chunk cache " + directory + ": a bound of 0 bytes");
  }
  GM_ASSIGN_OR_RETURN(ChunkStore store, ChunkStore::Open(directory, /*create=*/true));
  std::unique_ptr<DiskChunkCache> cache(new DiskChunkCache(std::move(store), max_bytes));
  cache->Scan();
  return cache;
}

void DiskChunkCache::Scan() {
  struct Found {
    ChunkHash hash;
    uint64_t bytes;
    int64_t mtime_s;
  };
  std::vector<Found> found;
  std::error_code error;
  const auto stale_before = std::filesystem::file_time_type::clock::now() - kStaleTemporary;
  for (auto it = std::filesystem::recursive_directory_iterator(directory(), error);
       !error && it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    if (!it->is_regular_file(error)) continue;
    const std::string name = it->path().filename().string();
    if (name.find(".tmp.") != std::string::npos) {
      if (it->last_write_time(error) < stale_before) std::filesystem::remove(it->path(), error);
      continue;
    }
    struct stat st {};
    const std::optional<ChunkHash> hash = ChunkHashFromHex(name);
    if (!hash || stat(it->path().c_str(), &st) != 0) continue;
    found.push_back({*hash, static_cast<uint64_t>(st.st_size), st.st_mtim.tv_sec});
  }
  if (error) {
    Log(LogLevel::kWarning, "chunk cache " + directory() + ": scanning it: " + error.message());
  }
  // Oldest first, so that each one added is the newest so far.
  std::sort(found.begin(), found.end(),
            [](const Found& a, const Found& b) { return a.mtime_s < b.mtime_s; });
  std::lock_guard lock(mu_);
  for (const Found& f : found) AddLocked(f.hash, f.bytes, f.mtime_s);
  EvictLocked();
}

void DiskChunkCache::AddLocked(const ChunkHash& hash, uint64_t bytes, int64_t touched_s) {
  if (entries_.count(hash) != 0) EraseLocked(hash);
  lru_.push_front(hash);
  entries_.emplace(hash, Entry{.bytes = bytes, .touched_s = touched_s, .lru = lru_.begin()});
  counters_.bytes += bytes;
  ++counters_.entries;
}

void DiskChunkCache::EraseLocked(const ChunkHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return;
  counters_.bytes -= it->second.bytes;
  --counters_.entries;
  lru_.erase(it->second.lru);
  entries_.erase(it);
}

void DiskChunkCache::EvictLocked() {
  while (counters_.bytes > max_bytes_ && !lru_.empty()) {
    const ChunkHash oldest = lru_.back();
    unlink(store_.PathOf(oldest).c_str());
    EraseLocked(oldest);
    ++counters_.evicted;
  }
}

Result<StoredChunk> DiskChunkCache::Get(const ChunkHash& hash, uint64_t max_compressed) {
  {
    std::lock_guard lock(mu_);
    if (entries_.count(hash) == 0) {
      ++counters_.misses;
      return Error(ErrorCode::kNotFound, "chunk cache: no chunk " + ToHex(hash));
    }
  }
  auto got = store_.Get(hash, max_compressed);
  std::lock_guard lock(mu_);
  auto it = entries_.find(hash);
  if (!got) {
    // Gone under us (another daemon evicted it) or torn: either way it is not here.
    ++counters_.misses;
    if (got.error().code() == ErrorCode::kDataLoss) {
      unlink(store_.PathOf(hash).c_str());
      ++counters_.forgotten;
    }
    EraseLocked(hash);
    return got;
  }
  ++counters_.hits;
  if (it != entries_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    const int64_t now = NowSeconds();
    if (now - it->second.touched_s >= kTouchEverySeconds) {
      it->second.touched_s = now;
      utimensat(AT_FDCWD, store_.PathOf(hash).c_str(), nullptr, 0);  // now, for both stamps
    }
  }
  return got;
}

Status DiskChunkCache::Put(const ChunkHash& hash, const StoredChunk& chunk) {
  const uint64_t bytes = ChunkStore::kHeaderBytes + chunk.compressed.size();
  if (bytes > max_bytes_) return OkStatus();
  GM_RETURN_IF_ERROR(store_.Write(hash, chunk));
  std::lock_guard lock(mu_);
  AddLocked(hash, bytes, NowSeconds());
  ++counters_.added;
  EvictLocked();
  return OkStatus();
}

void DiskChunkCache::Forget(const ChunkHash& hash) {
  std::lock_guard lock(mu_);
  unlink(store_.PathOf(hash).c_str());
  if (entries_.count(hash) != 0) ++counters_.forgotten;
  EraseLocked(hash);
}

DiskChunkCache::Counters DiskChunkCache::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

}  // namespace guestmem
