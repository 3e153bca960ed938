// SnapshotCache: what guestmem keeps per snapshot between runs, in a directory of its own.
//
// Each snapshot's zero map (zero_map.h), so that a snapshot's content is scanned once, not at
// every start, and its learned working set (working_set.h). An entry is keyed by the file (device and inode) and records the snapshot's
// whole identity (size, time stamps, a hash of sampled content) and a checksum. What the cache
// holds is only ever a hint: an entry that is missing, stale (made for another version of the
// file) or corrupt (torn, bad checksum) is found out, rebuilt from the snapshot and logged —
// never trusted into a wrong byte. Entries are written to a temporary file and renamed into
// place, so a crash leaves either the old entry or the new one.
//
// Thread safety: methods may be called from many threads; two processes updating one entry at
// once each write a whole entry (the last rename wins).
#ifndef GUESTMEM_SNAPSHOT_CACHE_H_
#define GUESTMEM_SNAPSHOT_CACHE_H_

#include <memory>
#include <string>

#include "guestmem/page_source.h"
#include "guestmem/result.h"
#include "guestmem/working_set.h"
#include "guestmem/zero_map.h"

namespace guestmem {

class SnapshotCache {
 public:
  // The directory used when none is named: /var/cache/guestmem as root; otherwise
  // $XDG_CACHE_HOME/guestmem, or ~/.cache/guestmem without XDG_CACHE_HOME.
  static std::string DefaultDirectory();

  // Uses `directory`, creating it (mode 0700) and its parents when missing.
  // ERRORS: the PosixError of mkdir, or kInvalidArgument when it is not a directory.
  static Result<SnapshotCache> Open(const std::string& directory);

  const std::string& directory() const { return directory_; }

  // The zero map of `source`: the cached one if it was made for this very file, else a fresh
  // scan, kept for next time (a cache that cannot be written is logged, never an error).
  // ERRORS: the source's, when it must be scanned and cannot be read.
  Result<std::shared_ptr<const ZeroMap>> ZeroMapFor(const RawFileSource& source) const;

  // What was learned of the snapshot `identity` names. ERRORS: kNotFound when nothing was (an
  // entry that is stale or corrupt is logged, removed and reported as kNotFound).
  Result<WorkingSet> WorkingSetFor(const SnapshotIdentity& identity) const;
  // Keeps `learned` for the snapshot, in place of what was kept before. Not synced to the disk:
  // an entry torn by a crash is found out by its checksum and learned again.
  Status KeepWorkingSet(const SnapshotIdentity& identity, const WorkingSet& learned) const;
  // Forgets what was learned of `file`; OK when nothing was.
  Status ForgetWorkingSet(const FileIdentity& file) const;

  // Where the entries of `file` live (for tests and `gmem` tools).
  std::string ZeroMapPath(const FileIdentity& file) const;
  std::string WorkingSetPath(const FileIdentity& file) const;

 private:
  explicit SnapshotCache(std::string directory) : directory_(std::move(directory)) {}
  std::string directory_;
};

}  // namespace guestmem

#endif  // GUESTMEM_SNAPSHOT_CACHE_H_
