#include "guestmem/remote_pack_storage.h"

#include "guestmem/log.h"

namespace guestmem {
namespace {

// What a pack names (its parent, its store) beside it. Only a path: a URL there would send the
// daemon, with its credentials, wherever the pack's author chose.
Result<ObjectUrl> Beside(const ObjectUrl& pack, const std::string& name, const char* what) {
  if (ObjectUrl::Names(name)) {
    return Error(ErrorCode::kDataLoss, pack.ToString() + " names its " + what + " by a URL (" +
                                           name + "); a pack may name only paths beside it");
  }
  ObjectUrl beside = pack.Resolve(name);
  // What no URL may hold (control characters, a path that leaves the bucket) does not parse back.
  if (auto again = ObjectUrl::Parse(beside.ToString()); !again || !(*again == beside)) {
    return Error(ErrorCode::kDataLoss,
                 pack.ToString() + " names its " + what + " by a path no URL can hold");
  }
  return beside;
}

}  // namespace

ObjectUrl ChunkObject(const ObjectUrl& store, const ChunkHash& hash) {
  const std::string hex = ToHex(hash);
  ObjectUrl chunk = store;
  if (!chunk.path.empty() && chunk.path.back() != '/') chunk.path += '/';
  chunk.path += hex.substr(0, 2) + "/" + hex;
  return chunk;
}

Result<std::unique_ptr<RemotePackStorage>> RemotePackStorage::Open(const ObjectUrl& url,
                                                                   RemoteAccess access) {
  if (access.store == nullptr) {
    return Error(ErrorCode::kInvalidArgument, url.ToString() + ": no object store to read it from");
  }
  GM_ASSIGN_OR_RETURN(uint64_t size, access.store->Size(url));
  return std::unique_ptr<RemotePackStorage>(new RemotePackStorage(url, size, std::move(access)));
}

Status RemotePackStorage::ReadAt(uint64_t offset, std::span<std::byte> out) const {
  return access_.store->ReadRange(url_, offset, out, access_.fetch_deadline);
}

Status RemotePackStorage::OpenStore(const std::string& store_path) {
  // An object store has no directories to check: a missing chunk shows as kNotFound when read.
  GM_ASSIGN_OR_RETURN(store_, Beside(url_, store_path, "chunk store"));
  return OkStatus();
}

Result<StoredChunk> RemotePackStorage::Fetch(const ChunkRef& ref, uint32_t raw_bytes) const {
  if (ref.location == ChunkLocation::kInline) return ReadInlineChunk(*this, ref, raw_bytes);
  if (!store_) return Error(ErrorCode::kFailedPrecondition, name_ + ": names no chunk store");
  const ObjectUrl object = ChunkObject(*store_, ref.hash);
  GM_ASSIGN_OR_RETURN(std::vector<std::byte> file,
                      access_.store->ReadWhole(
                          object, ChunkStore::kHeaderBytes + ChunkStore::MaxCompressed(raw_bytes),
                          access_.fetch_deadline));
  return ChunkStore::Decode(file, object.ToString());
}

Result<StoredChunk> RemotePackStorage::ReadChunk(const ChunkRef& ref, uint32_t raw_bytes,
                                                 bool again) const {
  DiskChunkCache* disk = access_.disk_cache.get();
  if (disk != nullptr) {
    if (again) {
      disk->Forget(ref.hash);
    } else if (auto kept = disk->Get(ref.hash, ChunkStore::MaxCompressed(raw_bytes))) {
      return kept;
    }
  }
  GM_ASSIGN_OR_RETURN(StoredChunk chunk, Fetch(ref, raw_bytes));
  fetched_.fetch_add(1, std::memory_order_relaxed);
  if (disk != nullptr) {
    // The chunk is served all the same; only the next restore must fetch it again.
    if (Status kept = disk->Put(ref.hash, chunk); !kept) {
      Log(LogLevel::kWarning, "chunk " + ToHex(ref.hash) + " of " + name_ +
                                  " not kept on disk: " + kept.error().ToString());
    }
  }
  return chunk;
}

Result<std::unique_ptr<PackStorage>> RemotePackStorage::OpenParent(
    const std::string& parent_path) const {
  GM_ASSIGN_OR_RETURN(const ObjectUrl parent_url, Beside(url_, parent_path, "parent"));
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RemotePackStorage> parent, Open(parent_url, access_));
  return std::unique_ptr<PackStorage>(std::move(parent));
}

}  // namespace guestmem
