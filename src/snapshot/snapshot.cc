#include "guestmem/snapshot.h"

#include "guestmem/log.h"
#include "guestmem/remote_pack_storage.h"
#include "guestmem/zero_map.h"

namespace guestmem {

Result<std::shared_ptr<const Snapshot>> Snapshot::Open(const std::string& path,
                                                       const SnapshotCache* cache,
                                                       PackedSourceOptions packed,
                                                       const RemoteAccess* remote) {
  if (ObjectUrl::Names(path)) {
    GM_ASSIGN_OR_RETURN(ObjectUrl url, ObjectUrl::Parse(path));
    if (remote == nullptr) {
      return Error(ErrorCode::kInvalidArgument, path + ": no object store to read it from");
    }
    GM_ASSIGN_OR_RETURN(std::unique_ptr<RemotePackStorage> storage,
                        RemotePackStorage::Open(url, *remote));
    GM_ASSIGN_OR_RETURN(std::unique_ptr<PackedSource> opened,
                        PackedSource::Open(std::move(storage), std::move(packed)));
    const PackedSource* as_packed = opened.get();
    return std::shared_ptr<const Snapshot>(
        new Snapshot(std::shared_ptr<const PageSource>(std::move(opened)), nullptr, as_packed));
  }
  GM_ASSIGN_OR_RETURN(std::unique_ptr<PageSource> opened,
                      OpenAnySnapshot(path, std::move(packed)));
  if (auto* raw = dynamic_cast<RawFileSource*>(opened.get())) {
    auto zero_map = cache != nullptr ? cache->ZeroMapFor(*raw) : ZeroMap::Scan(*raw);
    if (zero_map) {
      raw->SetZeroMap(std::move(*zero_map));
    } else {
      Log(LogLevel::kWarning, "zero pages of " + path + " not found (" +
                                  zero_map.error().ToString() + "): only its holes are known zero");
    }
    std::shared_ptr<const RawFileSource> file(static_cast<RawFileSource*>(opened.release()));
    return std::shared_ptr<const Snapshot>(new Snapshot(file, file, nullptr));
  }
  auto* as_packed = static_cast<PackedSource*>(opened.get());
  std::shared_ptr<const PageSource> source(std::move(opened));
  // The packed file's own identity: the file() of the source, kept alive by it.
  std::shared_ptr<const RawFileSource> file(source, as_packed->storage().file());
  return std::shared_ptr<const Snapshot>(new Snapshot(source, file, as_packed));
}

const std::string& Snapshot::path() const {
  return file_ != nullptr ? file_->path() : packed_->storage().name();
}

std::vector<uint64_t> Snapshot::packed_working_set() const {
  return packed_ != nullptr ? packed_->index().working_set : std::vector<uint64_t>{};
}

}  // namespace guestmem
