// RemotePackStorage: a packed snapshot that lives in an S3 store or on a web server, read by
// range (object_store.h), its chunks kept on local disk as they arrive (disk_chunk_cache.h).
//
// The pack is one object: its header and index are read once, at Open, and each inline chunk is
// one ranged GET of exactly its bytes. A chunk kept in a store is the object the store's path
// names, relative to the pack, under ab/<hash> (`gmem snapshot push` lays them out so), read
// whole. Either way a chunk is looked for in the disk cache first and kept there once fetched, so
// a chunk is fetched once for every VM and every snapshot on the host that needs it — the chunk
// cache in memory (chunk_cache.h) makes concurrent wants of one chunk a single read.
//
// Every fetch is bounded by `fetch_deadline` (retries included): past it the read fails with
// kIoError naming the object and the range, which poisons the pages that needed the chunk; a
// later fault asks again.
//
// Thread safety: every const method is safe from many threads at once.
#ifndef GUESTMEM_REMOTE_PACK_STORAGE_H_
#define GUESTMEM_REMOTE_PACK_STORAGE_H_

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "guestmem/disk_chunk_cache.h"
#include "guestmem/object_store.h"
#include "guestmem/pack_storage.h"

namespace guestmem {

struct RemoteAccess {
  std::shared_ptr<const ObjectStore> store;
  std::shared_ptr<DiskChunkCache> disk_cache;  // null: nothing kept on disk
  std::chrono::milliseconds fetch_deadline{10000};
};

class RemotePackStorage final : public PackStorage {
 public:
  // The pack at `url` (its size by a HEAD). ERRORS: those of ObjectStore::Size — kNotFound and
  // kPermissionDenied naming the cause.
  static Result<std::unique_ptr<RemotePackStorage>> Open(const ObjectUrl& url, RemoteAccess access);

  const std::string& name() const override { return name_; }
  uint64_t size() const override { return size_; }
  Status ReadAt(uint64_t offset, std::span<std::byte> out) const override;
  Status OpenStore(const std::string& store_path) override;
  Result<StoredChunk> ReadChunk(const ChunkRef& ref, uint32_t raw_bytes, bool again) const override;
  Result<std::unique_ptr<PackStorage>> OpenParent(const std::string& parent_path) const override;

  // Chunks fetched from the store (not found on disk).
  uint64_t chunks_fetched() const { return fetched_.load(std::memory_order_relaxed); }

 private:
  RemotePackStorage(ObjectUrl url, uint64_t size, RemoteAccess access)
      : url_(std::move(url)), name_(url_.ToString()), size_(size), access_(std::move(access)) {}
  Result<StoredChunk> Fetch(const ChunkRef& ref, uint32_t raw_bytes) const;

  ObjectUrl url_;
  std::string name_;
  uint64_t size_;
  RemoteAccess access_;
  std::optional<ObjectUrl> store_;
  mutable std::atomic<uint64_t> fetched_{0};
};

// The object a chunk store at `store` keeps the chunk `hash` as: store/ab/<hash>.
ObjectUrl ChunkObject(const ObjectUrl& store, const ChunkHash& hash);

}  // namespace guestmem

#endif  // GUESTMEM_REMOTE_PACK_STORAGE_H_
