#include "guestmem/pack_storage.h"

#include <filesystem>

namespace guestmem {
namespace {

// `name` as the pack at `from` names it: relative to that file's directory unless absolute.
std::string Beside(const std::string& from, const std::string& name) {
  if (name.empty() || name.front() == '/') return name;
  return (std::filesystem::path(from).parent_path() / name).lexically_normal().string();
}

}  // namespace

Result<StoredChunk> ReadInlineChunk(const PackStorage& pack, const ChunkRef& ref,
                                    uint32_t raw_bytes) {
  StoredChunk chunk{.codec = ref.codec, .raw_bytes = raw_bytes};
  chunk.compressed.resize(ref.compressed_bytes);
  GM_RETURN_IF_ERROR(pack.ReadAt(ref.offset, chunk.compressed));
  return chunk;
}

Result<std::unique_ptr<LocalPackStorage>> LocalPackStorage::Open(const std::string& path,
                                                                 std::string store_directory) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> file, RawFileSource::Open(path));
  return std::unique_ptr<LocalPackStorage>(
      new LocalPackStorage(std::move(file), std::move(store_directory)));
}

Status LocalPackStorage::ReadAt(uint64_t offset, std::span<std::byte> out) const {
  return file_->ReadAt(FileOffset(offset), out);
}

Status LocalPackStorage::OpenStore(const std::string& store_path) {
  const std::string dir = store_directory_.empty() ? Beside(name(), store_path) : store_directory_;
  GM_ASSIGN_OR_RETURN(ChunkStore opened, ChunkStore::Open(dir, /*create=*/false));
  store_ = std::move(opened);
  return OkStatus();
}

Result<StoredChunk> LocalPackStorage::ReadChunk(const ChunkRef& ref, uint32_t raw_bytes,
                                                bool /*again: nothing kept on the way*/) const {
  if (ref.location == ChunkLocation::kInline) return ReadInlineChunk(*this, ref, raw_bytes);
  if (!store_) {
    return Error(ErrorCode::kFailedPrecondition, name() + ": names no chunk store");
  }
  return store_->Get(ref.hash, ChunkStore::MaxCompressed(raw_bytes));
}

Result<std::unique_ptr<PackStorage>> LocalPackStorage::OpenParent(
    const std::string& parent_path) const {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<LocalPackStorage> parent,
                      Open(Beside(name(), parent_path), store_directory_));
  return std::unique_ptr<PackStorage>(std::move(parent));
}

}  // namespace guestmem
