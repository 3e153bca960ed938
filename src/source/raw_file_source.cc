#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>

#include "base/hex.h"
#include "guestmem/os.h"
#include "guestmem/page_source.h"
#include "guestmem/zero_map.h"

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

int64_t Nanoseconds(const timespec& t) {
  return static_cast<int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

FileIdentity IdentityOf(const struct stat& st, uint64_t size) {
  return FileIdentity{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), size,
                      Nanoseconds(st.st_mtim), Nanoseconds(st.st_ctim)};
}

// A block device's size: st_size is 0 for it.
Result<uint64_t> BlockDeviceSize(int fd, const std::string& what) {
  const off_t end = lseek(fd, 0, SEEK_END);
  if (end < 0) return PosixError(errno, "size of block device " + what);
  return static_cast<uint64_t>(end);
}

// What differs between two identities of one file: "size 4096 -> 8192, mtime +1.250 s".
std::string DescribeChange(const FileIdentity& was, const FileIdentity& now) {
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : ", ") + part; };
  if (was.size != now.size)
    add("size " + std::to_string(was.size) + " -> " + std::to_string(now.size));
  auto stamp = [&](const char* name, int64_t a, int64_t b) {
    if (a == b) return;
    char buf[64];
    (void)std::snprintf(buf, sizeof(buf), "%s %+.3f s", name, static_cast<double>(b - a) / 1e9);
    add(buf);
  };
  stamp("mtime", was.mtime_ns, now.mtime_ns);
  stamp("ctime", was.ctime_ns, now.ctime_ns);
  return out;
}

}  // namespace

Result<FileIdentity> IdentifyFile(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return PosixError(errno, "fstat fd " + std::to_string(fd));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    GM_ASSIGN_OR_RETURN(size, BlockDeviceSize(fd, "fd " + std::to_string(fd)));
  }
  return IdentityOf(st, size);
}

Result<FileIdentity> IdentifyFile(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return PosixError(errno, "stat " + path);
  if (!S_ISBLK(st.st_mode)) return IdentityOf(st, static_cast<uint64_t>(st.st_size));
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return PosixError(errno, "opening block device " + path);
  return IdentifyFile(fd.get());
}

Result<std::string> RawFileSource::WhatChanged() const {
  GM_ASSIGN_OR_RETURN(const FileIdentity at_path, IdentifyFile(path_));
  if (at_path.dev != identity_.dev || at_path.ino != identity_.ino) {
    return path_ + " is another file now (inode " + std::to_string(identity_.ino) + " -> " +
           std::to_string(at_path.ino) + ")";
  }
  GM_ASSIGN_OR_RETURN(const FileIdentity open_file, IdentifyFile(fd_.get()));
  for (const FileIdentity& now : {at_path, open_file}) {
    if (now != identity_) return DescribeChange(identity_, now);
  }
  if (recently_written_) {
    return "written less than " + std::to_string(kRecentWrite.count()) +
           " s before it was opened: its time stamps cannot tell a write since";
  }
  return std::string();
}

Result<std::unique_ptr<RawFileSource>> RawFileSource::Open(const std::string& path, Os* os) {
  return Open(path, os, kRecentWrite);
}

Result<std::unique_ptr<RawFileSource>> RawFileSource::Open(const std::string& path, Os* os,
                                                           std::chrono::nanoseconds recent_write) {
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
  // The identity before the holes are mapped: a write while they are makes it differ later.
  const FileIdentity identity = IdentityOf(st, size);
  const int64_t now_ns = Nanoseconds([] {
    timespec t{};
    clock_gettime(CLOCK_REALTIME, &t);
    return t;
  }());
  const bool recently_written =
      std::max(identity.mtime_ns, identity.ctime_ns) > now_ns - recent_write.count();
  GM_ASSIGN_OR_RETURN(std::vector<Extent> data, MapDataExtents(fd.get(), size, path, os));
  // A view for the kernel to copy from; without one (an empty file, a file system that cannot
  // map), content is read into buffers instead. Nor is there one on an Os other than the
  // kernel's own: the kernel's copies from a view would bypass the reads such an Os stands in
  // for (a test's, failing them on purpose).
  Mapping view;
  if (size > 0 && os == Os::Default()) {
    auto mapped =
        Mapping::Map(size, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd.get(), 0, nullptr, os);
    if (mapped) view = std::move(*mapped);
  }
  return std::unique_ptr<RawFileSource>(new RawFileSource(
      path, std::move(fd), size, std::move(data), identity, recently_written, std::move(view), os));
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

std::span<const std::byte> RawFileSource::View(FileOffset offset, uint64_t length) const {
  const uint64_t at = offset.value();
  if (!view_.valid() || at > size_ || length > size_ - at) return {};
  return std::span<const std::byte>(view_.bytes() + at, length);
}

void RawFileSource::WillNeed(FileOffset offset, uint64_t length) const {
  const uint64_t at = offset.value();
  if (at >= size_) return;
  (void)posix_fadvise(fd_.get(), static_cast<off_t>(at),
                      static_cast<off_t>(std::min(length, size_ - at)), POSIX_FADV_WILLNEED);
}

void RawFileSource::SetZeroMap(std::shared_ptr<const ZeroMap> zero_map) {
  zero_map_ = std::move(zero_map);
}

Result<Extent> RawFileSource::ExtentAt(FileOffset offset) const {
  const uint64_t at = offset.value();
  if (at >= size_) {
    return Error(ErrorCode::kOutOfRange, "extent at " + Hex(at) + " past the end of " + path_);
  }
  if (zero_map_ != nullptr && at / kPageSize4K < zero_map_->page_count()) {
    // Zero by content (holes included): runs of whole pages.
    const uint64_t page = at / kPageSize4K;
    const uint64_t end = zero_map_->RunEnd(page, zero_map_->page_count());
    const uint64_t run_end = std::min(size_, end * kPageSize4K);
    return Extent{offset, run_end - at,
                  zero_map_->IsZero(page) ? ExtentKind::kZero : ExtentKind::kData};
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
  const unsigned zero_percent =
      zero_map_ == nullptr || zero_map_->page_count() == 0
          ? 0
          : static_cast<unsigned>(zero_map_->zero_pages() * 100 / zero_map_->page_count());
  std::string size;
  if (size_ >= (uint64_t{1} << 20)) {
    size = std::to_string(size_ >> 20) + " MiB";
  } else if (size_ >= 1024) {
    size = std::to_string(size_ >> 10) + " KiB";
  } else {
    size = std::to_string(size_) + " bytes";
  }
  std::string out =
      "raw file " + path_ + " (" + size + ", " + std::to_string(holes_percent) + "% holes";
  if (zero_map_ != nullptr) out += ", " + std::to_string(zero_percent) + "% zero pages";
  return out + ")";
}

}  // namespace guestmem
