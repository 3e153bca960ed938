#include "guestmem/snapshot_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "base/hex.h"
#include "base/whole_file.h"
#include "guestmem/log.h"

namespace guestmem {
namespace {

// A missing entry is kNotFound, as a missing file is (cache entries are small).
Result<std::vector<std::byte>> ReadWhole(const std::string& path) {
  auto bytes = ReadWholeFile(path, uint64_t{1} << 30);
  if (!bytes && bytes.error().code() == ErrorCode::kNotFound) {
    return Error(ErrorCode::kNotFound, "no entry " + path);
  }
  return bytes;
}

Status WriteAtomically(const std::string& path, const std::string& bytes,
                       Durability durability = Durability::kSynced) {
  return WriteFileAtomically(path, std::as_bytes(std::span(bytes)), durability, "cache");
}

}  // namespace

std::string SnapshotCache::DefaultDirectory() {
  if (geteuid() == 0) return "/var/cache/guestmem";
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && xdg[0] == '/') {
    return std::string(xdg) + "/guestmem";
  }
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr && home[0] != '\0' ? home : "/tmp") + "/.cache/guestmem";
}

Result<SnapshotCache> SnapshotCache::Open(const std::string& directory) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) {
    return PosixError(error.value(), "cache: creating " + directory);
  }
  if (!std::filesystem::is_directory(directory)) {
    return Error(ErrorCode::kInvalidArgument, "cache: " + directory + " is not a directory");
  }
  (void)chmod(directory.c_str(), 0700);
  for (const char* sub : {"/zero", "/ws"}) {
    std::filesystem::create_directories(directory + sub, error);
    if (error) return PosixError(error.value(), "cache: creating " + directory + sub);
  }
  return SnapshotCache(directory);
}

namespace {

// "<dir>/<sub>/<dev>-<ino><suffix>": one entry per file, whatever its version.
std::string EntryPath(const std::string& directory, const char* sub, const FileIdentity& file,
                      const char* suffix) {
  char name[64];
  (void)std::snprintf(name, sizeof(name), "%016llx-%016llx%s",
                      static_cast<unsigned long long>(file.dev),
                      static_cast<unsigned long long>(file.ino), suffix);
  return directory + "/" + sub + "/" + name;
}

}  // namespace

std::string SnapshotCache::ZeroMapPath(const FileIdentity& file) const {
  return EntryPath(directory_, "zero", file, ".zmap");
}

std::string SnapshotCache::WorkingSetPath(const FileIdentity& file) const {
  return EntryPath(directory_, "ws", file, ".ws");
}

Result<WorkingSet> SnapshotCache::WorkingSetFor(const SnapshotIdentity& identity) const {
  const std::string path = WorkingSetPath(identity.file);
  GM_ASSIGN_OR_RETURN(std::vector<std::byte> bytes, ReadWhole(path));
  auto learned = WorkingSet::Parse(bytes, identity);
  if (learned) return learned;
  Log(LogLevel::kInfo, "working set " + path + " not used: " + learned.error().ToString() +
                           "; learning it again");
  (void)unlink(path.c_str());
  return Error(ErrorCode::kNotFound, "no usable working set " + path);
}

Status SnapshotCache::KeepWorkingSet(const SnapshotIdentity& identity,
                                     const WorkingSet& learned) const {
  return WriteAtomically(WorkingSetPath(identity.file), learned.Serialize(identity),
                         Durability::kUnsynced);
}

Status SnapshotCache::ForgetWorkingSet(const FileIdentity& file) const {
  const std::string path = WorkingSetPath(file);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return PosixError(errno, "cache: removing " + path);
  }
  return OkStatus();
}

Result<std::shared_ptr<const ZeroMap>> SnapshotCache::ZeroMapFor(
    const RawFileSource& source) const {
  GM_ASSIGN_OR_RETURN(SnapshotIdentity identity, IdentifySnapshot(source));
  const std::string path = ZeroMapPath(identity.file);
  std::string why;
  if (auto bytes = ReadWhole(path); bytes) {
    auto cached = ZeroMap::Parse(*bytes, identity);
    if (cached) return cached;
    why = cached.error().ToString();
  } else {
    why = "none kept yet";
  }
  Log(LogLevel::kInfo, "zero map of " + source.path() + ": " + why + "; scanning the file");
  GM_ASSIGN_OR_RETURN(std::shared_ptr<const ZeroMap> scanned, ZeroMap::Scan(source));
  if (Status kept = WriteAtomically(path, scanned->Serialize(identity)); !kept) {
    Log(LogLevel::kWarning,
        "zero map of " + source.path() + " not kept: " + kept.error().ToString());
  }
  return scanned;
}

}  // namespace guestmem
