// DiskChunkCache: compressed chunks of remote packed snapshots kept on local disk, shared by every
// VM and every snapshot served on the host and surviving restarts of the daemon.
//
// Chunks are named by their content hash (XXH3-128) and kept as a ChunkStore keeps them
// (DIR/ab/<hash>, written to a temporary file and renamed into place), so a chunk two snapshots
// share is kept once, and a crash leaves an entry whole or absent. An entry is only ever a copy:
// one that is torn or corrupt is found out by its hash when it is decoded (PackedSource), and
// Forget() drops it so that it is fetched again.
//
// The cache holds at most max_bytes of entries: what was used least recently goes first. Use is
// recorded in memory and in each entry's modification time (touched at most once a minute), so
// the order survives a restart: Open() scans the directory, oldest first, and removes what
// exceeds the bound and the temporary files a crash left. Several daemons may share one directory;
// each bounds what it sees of it.
//
// Thread safety: every method is safe from many threads at once.
#ifndef GUESTMEM_DISK_CHUNK_CACHE_H_
#define GUESTMEM_DISK_CHUNK_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "guestmem/chunk_store.h"
#include "guestmem/result.h"

namespace guestmem {

class DiskChunkCache {
 public:
  struct Counters {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t added = 0;
    uint64_t evicted = 0;
    uint64_t forgotten = 0;  // dropped as torn or corrupt
    uint64_t entries = 0;
    uint64_t bytes = 0;
  };

  // Uses `directory` (made when missing, with its parents), bounded to `max_bytes`.
  // ERRORS: those of ChunkStore::Open; kInvalidArgument for a bound of 0.
  static Result<std::unique_ptr<DiskChunkCache>> Open(const std::string& directory,
                                                      uint64_t max_bytes);

  // The chunk kept under `hash`, if any. ERRORS: kNotFound; kDataLoss for an entry that is not a
  // whole chunk (it is dropped).
  Result<StoredChunk> Get(const ChunkHash& hash, uint64_t max_compressed);
  // Keeps a chunk, then drops the least recently used entries beyond the bound. A chunk that
  // alone exceeds the bound is not kept. ERRORS: the PosixError of writing it.
  Status Put(const ChunkHash& hash, const StoredChunk& chunk);
  // Drops the entry of `hash` (torn or corrupt); OK when there is none.
  void Forget(const ChunkHash& hash);

  const std::string& directory() const { return store_.directory(); }
  uint64_t max_bytes() const { return max_bytes_; }
  Counters counters() const;

 private:
  struct Entry {
    uint64_t bytes = 0;
    int64_t touched_s = 0;  // when its modification time was last set
    std::list<ChunkHash>::iterator lru;
  };
  DiskChunkCache(ChunkStore store, uint64_t max_bytes)
      : store_(std::move(store)), max_bytes_(max_bytes) {}
  void Scan();                                                               // at Open
  void AddLocked(const ChunkHash& hash, uint64_t bytes, int64_t touched_s);  // REQUIRES(mu_)
  void EraseLocked(const ChunkHash& hash);                                   // REQUIRES(mu_)
  void EvictLocked();                                                        // REQUIRES(mu_)

  ChunkStore store_;
  const uint64_t max_bytes_;
  mutable std::mutex mu_;
  std::unordered_map<ChunkHash, Entry, ChunkHashHasher> entries_;  // GUARDED_BY(mu_)
  std::list<ChunkHash> lru_;                                       // GUARDED_BY(mu_): newest first
  Counters counters_;                                              // GUARDED_BY(mu_)
};

}  // namespace guestmem

#endif  // GUESTMEM_DISK_CHUNK_CACHE_H_
