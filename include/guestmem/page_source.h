// PageSource: where the content of guest pages comes from when they are first touched.
//
// A source is a byte range [0, size()) addressed by file offset (Firecracker's memory file: the
// regions back to back). It reads content and says which runs are known to be zero (holes), so
// that zero pages are installed without reading or copying anything.
//
// RawFileSource reads Firecracker's memory file as it is. Its holes are found once, when it is
// opened, with SEEK_DATA/SEEK_HOLE (never by scanning the content), so the fault path makes no
// lseek calls. A file written after that may hold data where its map says hole: WhatChanged()
// tells whether the file may have changed since, and an owner that serves new VMs over a long
// time opens a fresh source for them when it has.
//
// Thread safety: ReadAt and ExtentAt are safe from many threads at once.
#ifndef GUESTMEM_PAGE_SOURCE_H_
#define GUESTMEM_PAGE_SOURCE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

enum class ExtentKind { kData, kZero };

struct Extent {
  FileOffset offset;
  uint64_t length = 0;
  ExtentKind kind = ExtentKind::kData;
};

class PageSource {
 public:
  virtual ~PageSource() = default;

  virtual uint64_t size() const = 0;
  // Fills `out` completely with the content at `offset`, or fails: kOutOfRange past size(),
  // kDataLoss when the content is shorter than promised (truncated), kIoError when reading fails.
  virtual Status ReadAt(FileOffset offset, std::span<std::byte> out) const = 0;
  // The longest run of one kind that starts at `offset` (clipped to size()); holes are kZero.
  // kOutOfRange when offset >= size().
  virtual Result<Extent> ExtentAt(FileOffset offset) const = 0;
  // The content of [offset, offset + length) in place, for the kernel to copy from (UFFDIO_COPY,
  // pwrite(2)) so that nothing is copied twice; empty when the source has no such view. The
  // daemon itself must never touch these bytes: a file truncated meanwhile would raise SIGBUS in
  // it, where the kernel's copy fails cleanly (EFAULT).
  virtual std::span<const std::byte> View(FileOffset /*offset*/, uint64_t /*length*/) const {
    return {};
  }
  // As View, for content that lives only while something holds it (a decompressed chunk): the
  // bytes stay valid while `keep` is held. Empty bytes when there is no such view. The default
  // is View() with nothing to hold. ERRORS: those of ReadAt for the same range.
  struct HeldView {
    std::span<const std::byte> bytes;
    std::shared_ptr<const void> keep;
  };
  virtual Result<HeldView> HoldView(FileOffset offset, uint64_t length) const {
    return HeldView{.bytes = View(offset, length)};
  }
  // A hint that [offset, offset + length) will be read soon (a working set about to be
  // prefetched): the source may start reading it in the background. Nothing where it cannot.
  virtual void WillNeed(FileOffset /*offset*/, uint64_t /*length*/) const {}
  // For logs: "raw file snapshot.mem (256 MiB, 12% holes)".
  virtual std::string Describe() const = 0;
};

// What stat(2) says of a file that changes when its content does: which file it is (dev, ino),
// its size (a block device's from lseek) and its last modification and status change.
struct FileIdentity {
  uint64_t dev = 0;
  uint64_t ino = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  bool operator==(const FileIdentity&) const = default;
};

// The identity of the file at `path` (following symbolic links), or of an open descriptor.
Result<FileIdentity> IdentifyFile(const std::string& path);
Result<FileIdentity> IdentifyFile(int fd);

class ZeroMap;

class RawFileSource final : public PageSource {
 public:
  // Opens a regular file or a block device (its size from lseek), and maps it read-only for
  // View() — unless `os` is not Os::Default(): then every read goes through `os`, where a test
  // can fail it. ERRORS: kInvalidArgument for
  // anything else (a FIFO, a directory, a character device), found without waiting for a FIFO's
  // writer; the PosixError of open(2) (kNotFound for a missing file).
  static Result<std::unique_ptr<RawFileSource>> Open(const std::string& path, Os* os = nullptr);
  // As above; a file last written less than `recent_write` before it is opened is never taken to
  // be unchanged by WhatChanged() (kRecentWrite for the other overload).
  static Result<std::unique_ptr<RawFileSource>> Open(const std::string& path, Os* os,
                                                     std::chrono::nanoseconds recent_write);

  uint64_t size() const override { return size_; }
  Status ReadAt(FileOffset offset, std::span<std::byte> out) const override;
  Result<Extent> ExtentAt(FileOffset offset) const override;
  std::span<const std::byte> View(FileOffset offset, uint64_t length) const override;
  // posix_fadvise(WILLNEED): the kernel reads the range into the page cache asynchronously.
  void WillNeed(FileOffset offset, uint64_t length) const override;
  std::string Describe() const override;

  // Knows the zero pages by their content from now on (zero_map.h): ExtentAt reports them as
  // kZero. REQUIRES: `zero_map` was made from this file (ZeroMap::Scan or SnapshotCache), and the
  // source is not shared with other threads yet.
  void SetZeroMap(std::shared_ptr<const ZeroMap> zero_map);
  const std::shared_ptr<const ZeroMap>& zero_map() const { return zero_map_; }

  // The data extents found at open, sorted (everything else is a hole).
  const std::vector<Extent>& data_extents() const { return data_; }
  uint64_t hole_bytes() const;
  const std::string& path() const { return path_; }

  // The file's identity when it was opened, taken before its holes were mapped.
  const FileIdentity& identity() const { return identity_; }

  // Why the file may no longer be what was opened and mapped, or "" if it cannot have changed:
  // its path names another file now, the path's or the open file's size or time stamps differ
  // from identity(), or the file had been written less than kRecentWrite before it was opened
  // (a write soon after could keep the time stamps of the same coarse clock tick, so such a file
  // is never taken to be unchanged). ERRORS: the PosixError of stat(2) (kNotFound: the path is
  // gone).
  Result<std::string> WhatChanged() const;
  static constexpr std::chrono::seconds kRecentWrite{2};

 private:
  RawFileSource(std::string path, UniqueFd fd, uint64_t size, std::vector<Extent> data,
                FileIdentity identity, bool recently_written, Mapping view, Os* os)
      : path_(std::move(path)),
        fd_(std::move(fd)),
        size_(size),
        data_(std::move(data)),
        identity_(identity),
        recently_written_(recently_written),
        view_(std::move(view)),
        os_(os) {}

  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
  std::vector<Extent> data_;
  FileIdentity identity_;
  bool recently_written_;
  Mapping view_;  // the whole file, read-only, shared: for the kernel to copy from
  std::shared_ptr<const ZeroMap> zero_map_;
  Os* os_;
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_SOURCE_H_
