// Snapshot: a snapshot opened for restores — a raw memory file or a packed snapshot, told apart
// by its magic — with what a daemon needs of it besides its content.
//
// source() is what VMs are served from. file() is the file the path names (the raw memory file,
// or the packed snapshot's own file): what caches of the snapshot (zero maps, learned working
// sets) are keyed by, and what tells whether it changed since it was opened. A raw file gets its
// zero map from the cache (or a scan); a packed snapshot knows its zero pages by its index.
//
// A path that is a URL (s3://, http://, https://: object_store.h) names a packed snapshot in an
// object store, read through a RemotePackStorage. It has no file(): an object named by its URL is
// taken never to change, and what is learned of its restores is not kept (it carries the working
// set it was packed with).
//
// Thread safety: immutable after Open; safe from many threads.
#ifndef GUESTMEM_SNAPSHOT_H_
#define GUESTMEM_SNAPSHOT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "guestmem/packed_source.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"
#include "guestmem/snapshot_cache.h"

namespace guestmem {

struct RemoteAccess;

class Snapshot {
 public:
  // `cache`: where a raw file's zero map is kept (null: scanned at every open). A zero map that
  // cannot be had is logged; the snapshot is still served (zero pages then copied as data).
  // `remote`: how a URL is read (null: a URL is an error).
  // ERRORS: those of RawFileSource::Open, RemotePackStorage::Open and PackedSource::Open.
  static Result<std::shared_ptr<const Snapshot>> Open(const std::string& path,
                                                      const SnapshotCache* cache,
                                                      PackedSourceOptions packed = {},
                                                      const RemoteAccess* remote = nullptr);

  const std::shared_ptr<const PageSource>& source() const { return source_; }
  // The local file, or null for a snapshot named by a URL.
  const RawFileSource* file() const { return file_.get(); }
  // The path or URL it was opened from.
  const std::string& path() const;
  uint64_t size() const { return source_->size(); }
  std::string Describe() const { return source_->Describe(); }
  // The packed snapshot, or null for a raw memory file.
  const PackedSource* packed() const { return packed_; }
  // The working set packed with it (empty for a raw file, or when none was).
  std::vector<uint64_t> packed_working_set() const;

 private:
  Snapshot(std::shared_ptr<const PageSource> source, std::shared_ptr<const RawFileSource> file,
           const PackedSource* packed)
      : source_(std::move(source)), file_(std::move(file)), packed_(packed) {}

  std::shared_ptr<const PageSource> source_;
  std::shared_ptr<const RawFileSource> file_;  // aliases source_ for a raw file; null for a URL
  const PackedSource* packed_;
};

}  // namespace guestmem

#endif  // GUESTMEM_SNAPSHOT_H_
