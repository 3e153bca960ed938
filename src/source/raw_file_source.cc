#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "base/hex.h"
#include "guestmem/os.h"
#include "guestmem/page_source.h"

namespace guestmem {
namespace {

// Walks the file with SEEK_DATA/SEEK_HOLE and returns its data extents.
Result<std::vector<Extent>> MapDataExtents(int fd, uint64_t size, const std::string& path, Os* os) {
  std::vector<Extent> data;
  uint64_t at = 0;
  while (at < size) {
    const off_t start = os->Lseek(fd, static_cast<off_t>(at), SEEK_DATA);
    if (start == -ENXIO) break;  // only a hole from here to the end
    if (start == -EINVAL || start == -EOPNOTSUPP) {
      // No SEEK_DATA on this file system: treat everything as data.
      data.assign(1, Extent{FileOffset(0), size, ExtentKind::kData});
      return data;
    }
    if (start < 0) return PosixError(static_cast<int>(-start), "SEEK_DATA in " + path);
    const off_t end = os->Lseek(fd, start, SEEK_HOLE);
    if (end < 0) return PosixError(static_cast<int>(-end), "SEEK_HOLE in " + path);
    const uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(end), size);
    if (static_cast<uint64_t>(start) >= stop) break;
    data.push_back(Extent{FileOffset(static_cast<uint64_t>(start)),
                          stop - static_cast<uint64_t>(start), ExtentKind::kData});
    at = stop;
  }
  return data;
}

std::string FileTypeName(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "of an unknown file type";
}

}  // namespace

Result<std::unique_ptr<RawFileSource>> RawFileSource::Open(const std::string& path, Os* os) {
  if (os == nullptr) os = Os::Default();
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
  const int raw = os->Open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0);
  if (raw < 0) return PosixError(-raw, "opening memory file " + path);
  UniqueFd fd(raw);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return PosixError(errno, "fstat " + path);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Error(ErrorCode::kInvalidArgument, "memory file " + path + " is " +
                                                  FileTypeName(st.st_mode) +
                                                  ", not a regular file or a block device");
  }
  // Reads of regular files and block devices never wait anyway; clear the flag all the same.
  const int flags = fcntl(fd.get(), F_GETFL);
  if (flags < 0 || fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return PosixError(errno, "fcntl " + path);
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {  // st_size is 0: the device tells its size through lseek
    const off_t end = os->Lseek(fd.get(), 0, SEEK_END);
    if (end < 0) return PosixError(static_cast<int>(-end), "size of block device " + path);
    size = static_cast<uint64_t>(end);
  }
  GM_ASSIGN_OR_RETURN(std::vector<Extent> data, MapDataExtents(fd.get(), size, path, os));
  return std::unique_ptr<RawFileSource>(
      new RawFileSource(path, std::move(fd), size, std::move(data), os));
}

Status RawFileSource::ReadAt(FileOffset offset, std::span<std::byte> out) const {
  const uint64_t start = offset.value();
  if (start > size_ || out.size() > size_ - start) {
    return Error(ErrorCode::kOutOfRange, "read of " + Hex(out.size()) + " bytes at " + Hex(start) +
                                             " past the end of " + path_ + " (" + Hex(size_) +
                                             " bytes)");
  }
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = os_->Pread(fd_.get(), out.data() + done, out.size() - done,
                                 static_cast<off_t>(start + done));
    if (n < 0) {
      return PosixError(static_cast<int>(-n), "reading " + path_ + " at " + Hex(start + done));
    }
    if (n == 0) {
      return Error(ErrorCode::kDataLoss, path_ + " truncated: expected " + Hex(out.size()) +
                                             " bytes at " + Hex(start) + ", the file ends at " +
                                             Hex(start + done));
    }
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

Result<Extent> RawFileSource::ExtentAt(FileOffset offset) const {
  const uint64_t at = offset.value();
  if (at >= size_) {
    return Error(ErrorCode::kOutOfRange, "extent at " + Hex(at) + " past the end of " + path_);
  }
  // The first data extent that ends after `at`.
  auto it = std::upper_bound(data_.begin(), data_.end(), at, [](uint64_t v, const Extent& e) {
    return v < e.offset.value() + e.length;
  });
  if (it == data_.end()) return Extent{offset, size_ - at, ExtentKind::kZero};
  if (it->offset.value() <= at) {
    return Extent{offset, it->offset.value() + it->length - at, ExtentKind::kData};
  }
  return Extent{offset, it->offset.value() - at, ExtentKind::kZero};
}

uint64_t RawFileSource::hole_bytes() const {
  uint64_t data = 0;
  for (const Extent& e : data_) data += e.length;
  return size_ - data;
}

std::string RawFileSource::Describe() const {
  const unsigned holes_percent = size_ == 0 ? 0 : static_cast<unsigned>(hole_bytes() * 100 / size_);
  std::string size;
  if (size_ >= (uint64_t{1} << 20)) {
    size = std::to_string(size_ >> 20) + " MiB";
  } else if (size_ >= 1024) {
    size = std::to_string(size_ >> 10) + " KiB";
  } else {
    size = std::to_string(size_) + " bytes";
  }
  return "raw file " + path_ + " (" + size + ", " + std::to_string(holes_percent) + "% holes)";
}

}  // namespace guestmem
