// PackStorage: where one layer of a packed snapshot is read from — its pack (header, index and
// the chunks kept inline) and the chunk store that holds its other chunks.
//
// PackedSource (packed_source.h) reads every layer through one, so that where the bytes live is
// the storage's business alone: LocalPackStorage reads files (the pack, a ChunkStore directory);
// RemotePackStorage (remote_pack_storage.h) reads objects of an S3 store or a web server by range,
// through a DiskChunkCache.
//
// Thread safety: every const method is safe from many threads at once.
#ifndef GUESTMEM_PACK_STORAGE_H_
#define GUESTMEM_PACK_STORAGE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "guestmem/chunk_store.h"
#include "guestmem/packed_index.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"

namespace guestmem {

class PackStorage {
 public:
  virtual ~PackStorage() = default;

  // The pack's path or URL, for messages.
  virtual const std::string& name() const = 0;
  // The pack's size in bytes.
  virtual uint64_t size() const = 0;
  // Bytes of the pack. ERRORS: kIoError, kOutOfRange, and those of the storage.
  virtual Status ReadAt(uint64_t offset, std::span<std::byte> out) const = 0;

  // Uses the chunk store `store_path` names, as the pack names it (relative to the pack).
  // Called once, before any ReadChunk of a stored chunk. ERRORS: kNotFound.
  virtual Status OpenStore(const std::string& store_path) = 0;
  // The compressed bytes of chunk `ref`, whose content is `raw_bytes` long: inline in the pack or
  // in the store. `again`: the copy read before was not the chunk its hash names; read it from
  // its origin, past any copy kept on the way. ERRORS: kDataLoss for what is not a whole chunk,
  // kNotFound, kIoError.
  virtual Result<StoredChunk> ReadChunk(const ChunkRef& ref, uint32_t raw_bytes,
                                        bool again) const = 0;

  // The storage of the layer below, which this pack names `parent_path`.
  virtual Result<std::unique_ptr<PackStorage>> OpenParent(const std::string& parent_path) const = 0;

  // The local file the pack is, or null when it is not one (what caches of the snapshot are keyed
  // by, and what tells whether it changed).
  virtual const RawFileSource* file() const { return nullptr; }
};

// A pack in a local file, its chunk store a local directory.
class LocalPackStorage final : public PackStorage {
 public:
  // `store_directory`: the store to use in place of the one the pack names (empty: that one).
  // ERRORS: the PosixError of open(2).
  static Result<std::unique_ptr<LocalPackStorage>> Open(const std::string& path,
                                                        std::string store_directory = {});

  const std::string& name() const override { return file_->path(); }
  uint64_t size() const override { return file_->size(); }
  Status ReadAt(uint64_t offset, std::span<std::byte> out) const override;
  Status OpenStore(const std::string& store_path) override;
  Result<StoredChunk> ReadChunk(const ChunkRef& ref, uint32_t raw_bytes, bool again) const override;
  Result<std::unique_ptr<PackStorage>> OpenParent(const std::string& parent_path) const override;
  const RawFileSource* file() const override { return file_.get(); }

 private:
  LocalPackStorage(std::unique_ptr<RawFileSource> file, std::string store_directory)
      : file_(std::move(file)), store_directory_(std::move(store_directory)) {}

  std::unique_ptr<RawFileSource> file_;
  std::string store_directory_;
  std::optional<ChunkStore> store_;
};

// The compressed bytes of an inline chunk, read from `pack` (what every storage does for one).
Result<StoredChunk> ReadInlineChunk(const PackStorage& pack, const ChunkRef& ref,
                                    uint32_t raw_bytes);

}  // namespace guestmem

#endif  // GUESTMEM_PACK_STORAGE_H_
