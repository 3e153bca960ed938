#include "base/whole_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "guestmem/unique_fd.h"

namespace guestmem {

Result<std::vector<std::byte>> ReadWholeFile(const std::string& path, uint64_t max_bytes) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return PosixError(errno, "open " + path);
  UniqueFd owned(fd);
  struct stat st {};
  if (fstat(fd, &st) != 0) return PosixError(errno, "stat " + path);
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return Error(ErrorCode::kOutOfRange, path + " holds " + std::to_string(st.st_size) +
                                             " bytes, more than the " + std::to_string(max_bytes) +
                                             " expected");
  }
  std::vector<std::byte> out(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = read(fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "read " + path);
    if (n == 0) break;  // shrank meanwhile
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  return out;
}

std::string TemporaryPathFor(const std::string& path) {
  static std::atomic<uint64_t> serial{0};
  return path + ".tmp." + std::to_string(getpid()) + "." +
         std::to_string(serial.fetch_add(1, std::memory_order_relaxed));
}

Status WriteFileAtomically(const std::string& path, std::span<const std::byte> bytes,
                           Durability durability, const std::string& what) {
  const std::string temporary = TemporaryPathFor(path);
  const int fd = open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return PosixError(errno, what + ": create " + temporary);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      unlink(temporary.c_str());
      return PosixError(err, what + ": write " + temporary);
    }
    done += static_cast<size_t>(n);
  }
  if ((durability == Durability::kSynced && fsync(fd) != 0) || close(fd) != 0) {
    const int err = errno;
    unlink(temporary.c_str());
    return PosixError(err, what + ": sync " + temporary);
  }
  if (rename(temporary.c_str(), path.c_str()) != 0) {
    const int err = errno;
    unlink(temporary.c_str());
    return PosixError(err, what + ": rename to " + path);
  }
  return OkStatus();
}

}  // namespace guestmem
