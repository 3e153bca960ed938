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
// WillNeed() decodes the chunks of a range on a background thread of the source's own, so that a
// working set about to be prefetched is decompressed ahead of the installs that need it, in
// parallel with them; and a chunk a read had to wait for has the chunks after it decoded ahead
// the same way (kReadAheadChunks), for a guest that reads on.
//
// Thread safety: ReadAt, ExtentAt and WillNeed are safe from many threads at once.
#ifndef GUESTMEM_PACKED_SOURCE_H_
#define GUESTMEM_PACKED_SOURCE_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "guestmem/chunk_cache.h"
#include "guestmem/chunk_store.h"
#include "guestmem/packed_index.h"
#include "guestmem/page_source.h"

namespace guestmem {

struct PackedSourceOptions {
  // Decoded chunks kept in memory, for this source and its layers (ignored when `cache` is set).
  uint64_t cache_bytes = uint64_t{256} << 20;
  std::shared_ptr<ChunkCache> cache;  // shared with other sources; null: one of its own
  // The chunk store of every layer, in place of the one each names (relative to its file).
  std::string store_directory;
  // Background threads that decode what WillNeed names (0: none; WillNeed does nothing).
  unsigned decode_threads = 1;
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
  ~PackedSource() override;

  uint64_t size() const override { return index_.raw_size; }
  Status ReadAt(FileOffset offset, std::span<std::byte> out) const override;
  Result<Extent> ExtentAt(FileOffset offset) const override;
  // The bytes of a decompressed chunk when the range lies in one stored run of one chunk.
  Result<HeldView> HoldView(FileOffset offset, uint64_t length) const override;
  void WillNeed(FileOffset offset, uint64_t length) const override;
  std::string Describe() const override;

  const PackIndex& index() const { return index_; }
  const PackedSource* parent() const { return parent_.get(); }
  // The packed file itself (what caches of this snapshot are keyed by).
  const RawFileSource& file() const { return *file_; }
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
  PackedSource(std::unique_ptr<RawFileSource> file, PackIndex index,
               std::unique_ptr<PackedSource> parent, std::optional<ChunkStore> store,
               std::shared_ptr<ChunkCache> cache, unsigned decode_threads);
  static Result<std::unique_ptr<PackedSource>> OpenLayer(const std::string& path,
                                                         const PackedSourceOptions& options,
                                                         const std::shared_ptr<ChunkCache>& cache,
                                                         int depth);
  Error ChunkError(size_t chunk, const Error& why) const;
  // Queues chunks for the background decoders (bounded by what the cache can hold).
  void DecodeAhead(const std::vector<size_t>& chunks) const;
  void DecodeLoop();

  std::unique_ptr<RawFileSource> file_;
  PackIndex index_;
  std::unique_ptr<PackedSource> parent_;
  std::optional<ChunkStore> store_;
  std::shared_ptr<ChunkCache> cache_;

  // The background decoder: chunk indices WillNeed named, decoded in order.
  mutable std::mutex decode_mu_;
  mutable std::condition_variable decode_cv_;
  mutable std::deque<size_t> decode_queue_;  // GUARDED_BY(decode_mu_)
  bool stopping_ = false;                    // GUARDED_BY(decode_mu_)
  std::vector<std::thread> decoders_;
};

// The source a snapshot path names: a packed snapshot when the file starts with its magic, else
// the raw memory file. ERRORS: those of the two Opens.
Result<std::unique_ptr<PageSource>> OpenAnySnapshot(const std::string& path,
                                                    PackedSourceOptions options = {});

}  // namespace guestmem

#endif  // GUESTMEM_PACKED_SOURCE_H_
