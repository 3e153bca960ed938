// PageSource: where the content of guest pages comes from when they are first touched.
//
// A source is a byte range [0, size()) addressed by file offset (Firecracker's memory file: the
// regions back to back). It reads content and says which runs are known to be zero (holes), so
// that zero pages are installed without reading or copying anything.
//
// RawFileSource reads Firecracker's memory file as it is. Its holes are found once, when it is
// opened, with SEEK_DATA/SEEK_HOLE (never by scanning the content), so the fault path makes no
// lseek calls.
//
// Thread safety: ReadAt and ExtentAt are safe from many threads at once.
#ifndef GUESTMEM_PAGE_SOURCE_H_
#define GUESTMEM_PAGE_SOURCE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "guestmem/address.h"
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
  // For logs: "raw file snapshot.mem (256 MiB, 12% holes)".
  virtual std::string Describe() const = 0;
};

class RawFileSource final : public PageSource {
 public:
  // Opens a regular file or a block device (its size from lseek). ERRORS: kInvalidArgument for
  // anything else (a FIFO, a directory, a character device), found without waiting for a FIFO's
  // writer; the PosixError of open(2) (kNotFound for a missing file).
  static Result<std::unique_ptr<RawFileSource>> Open(const std::string& path, Os* os = nullptr);

  uint64_t size() const override { return size_; }
  Status ReadAt(FileOffset offset, std::span<std::byte> out) const override;
  Result<Extent> ExtentAt(FileOffset offset) const override;
  std::string Describe() const override;

  // The data extents found at open, sorted (everything else is a hole).
  const std::vector<Extent>& data_extents() const { return data_; }
  uint64_t hole_bytes() const;

 private:
  RawFileSource(std::string path, UniqueFd fd, uint64_t size, std::vector<Extent> data, Os* os)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size), data_(std::move(data)), os_(os) {}

  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
  std::vector<Extent> data_;
  Os* os_;
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_SOURCE_H_
