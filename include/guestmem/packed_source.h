// PackedSource: a PageSource that reads a packed snapshot (packed_index.h) and the chain of
// layers below it.
//
// A page's content comes from its run: zeros for a zero run, the parent's page for a parent run,
// and for a stored run the chunk that holds it — read (from the file or the chunk store),
// decompressed, checked against its hash and kept in a ChunkCache shared by everything that reads
// through this source (every VM restored from it, and its layers). A chunk that fails its check
// fails exactly the reads that need it (kDataLoss, naming the chunk and the pages it holds), so a
// restore poisons those pages and no other; it never hands out a wrong byte or zeros for data.
// Errors say whether trying again can help: kDataLoss (corrupt: no) or kIoError (the read failed:
// perhaps); see IsRetryable (result.h).
//
// Chunks are decoded on threads of the source's own (a BackgroundLoader): ContentReady() tells a
// fault pipeline whether a range can be read at once, and when it cannot, queues its chunks ahead
// of everything else and says when they are in — so that a worker serving many VMs never waits
// for a chunk to be read and decompressed. WillNeed() queues a working set about to be
// prefetched, and a chunk a reader waited for has the chunks after it decoded ahead
// (kReadAheadChunks), for a guest that reads on.
//
// Thread safety: every method is safe from many threads at once.
#ifndef GUESTMEM_PACKED_SOURCE_H_
#define GUESTMEM_PACKED_SOURCE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "guestmem/chunk_cache.h"
#include "guestmem/chunk_store.h"
#include "guestmem/pack_storage.h"
#include "guestmem/packed_index.h"
#include "guestmem/page_source.h"

namespace guestmem {

class BackgroundLoader;

struct PackedSourceOptions {
  // Decoded chunks kept in memory, for this source and its layers (ignored when `cache` is set).
  uint64_t cache_bytes = uint64_t{256} << 20;
  std::shared_ptr<ChunkCache> cache;  // shared with other sources; null: one of its own
  // The chunk store of every layer, in place of the one each names (relative to its file), for
  // local packs.
  std::string store_directory;
  // Background threads that decode chunks (0: none: every read decodes on its own thread, and
  // WillNeed does nothing).
  unsigned decode_threads = 2;
};

class PackedSource final : public PageSource {
 public:
  static constexpr int kMaxLayers = 32;
  static constexpr size_t kReadAheadChunks = 2;

  // Opens the packed snapshot at `path` and the layers below it. ERRORS: the PosixError of
  // open(2); kDataLoss for a file that is not a whole packed snapshot (naming what is wrong);
  // kUnsupported for another format version; kFailedPrecondition for a parent that is not the
  // snapshot a layer was packed over, or a chain deeper than kMaxLayers; kNotFound for a missing
  // parent or chunk store.
  static Result<std::unique_ptr<PackedSource>> Open(const std::string& path,
                                                    PackedSourceOptions options = {});
  // The same for a pack read through `storage` (a remote one: remote_pack_storage.h); its
  // parents are opened through the storage too, and options.store_directory is the storage's.
  static Result<std::unique_ptr<PackedSource>> Open(std::unique_ptr<PackStorage> storage,
                                                    PackedSourceOptions options = {});
  ~PackedSource() override;

  uint64_t size() const override { return index_.raw_size; }
  Status ReadAt(FileOffset offset, std::span<std::byte> out) const override;
  Result<Extent> ExtentAt(FileOffset offset) const override;
  // The bytes of a decompressed chunk when the range lies in one stored run of one chunk.
  Result<HeldView> HoldView(FileOffset offset, uint64_t length) const override;
  // Ready when every chunk the range needs is decompressed in the cache (or failed to be): else
  // they are decoded on the source's threads, ahead of anything wanted ahead, and `ready` runs.
  bool ContentReady(FileOffset offset, uint64_t length,
                    const std::function<void()>& ready) const override;
  void WillNeed(FileOffset offset, uint64_t length) const override;
  std::string Describe() const override;

  const PackIndex& index() const { return index_; }
  const PackedSource* parent() const { return parent_.get(); }
  // Where this layer is read from; its file() is the packed file itself when it is a local one
  // (what caches of this snapshot are keyed by).
  const PackStorage& storage() const { return *storage_; }
  const std::shared_ptr<ChunkCache>& cache() const { return cache_; }
  int layers() const { return parent_ ? parent_->layers() + 1 : 1; }
  uint64_t chunk_bytes() const { return uint64_t{index_.chunk_pages} * 4096; }

  // Chunk `chunk` of this layer read, decompressed and checked against its hash, bypassing the
  // cache (what `gmem snapshot verify` does). ERRORS: kDataLoss naming the chunk and its pages;
  // kIoError.
  Result<ChunkCache::Chunk> LoadChunk(size_t chunk) const;
  // The same through the cache.
  Result<ChunkCache::Chunk> Chunk(size_t chunk) const;

 private:
  PackedSource(std::unique_ptr<PackStorage> storage, PackIndex index,
               std::unique_ptr<PackedSource> parent, std::shared_ptr<ChunkCache> cache,
               unsigned decode_threads);
  static Result<std::unique_ptr<PackedSource>> OpenLayer(std::unique_ptr<PackStorage> storage,
                                                         const PackedSourceOptions& options,
                                                         const std::shared_ptr<ChunkCache>& cache,
                                                         int depth);
  Error ChunkError(size_t chunk, const Error& why) const;
  // The chunks that hold the stored pages of [page, end) of this layer, in order; parent runs go
  // to `parent_range` (first page, end).
  void ChunksOf(uint64_t page, uint64_t end, std::vector<size_t>* chunks,
                std::vector<std::pair<uint64_t, uint64_t>>* parent_ranges) const;
  // The chunks after `chunk`, decoded ahead for a reader that reads on.
  void ReadAheadAfter(size_t chunk) const;

  std::unique_ptr<PackStorage> storage_;
  PackIndex index_;
  std::unique_ptr<PackedSource> parent_;
  std::shared_ptr<ChunkCache> cache_;

  // Declared last, so destroyed first: its threads use everything above.
  std::unique_ptr<BackgroundLoader> decoder_;
};

// The source a snapshot path names: a packed snapshot when the file starts with its magic, else
// the raw memory file. ERRORS: those of the two Opens.
Result<std::unique_ptr<PageSource>> OpenAnySnapshot(const std::string& path,
                                                    PackedSourceOptions options = {});

}  // namespace guestmem

#endif  // GUESTMEM_PACKED_SOURCE_H_
