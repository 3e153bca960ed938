#include "soak/failing_source_os.h"

#include <cerrno>

#include "soak/content.h"

namespace guestmem::soak {

ssize_t FailingSourceOs::Pread(int fd, void* buf, size_t count, off_t offset) {
  if (count == 0 || offset < 0) return OsWrapper::Pread(fd, buf, count, offset);
  const uint64_t start = static_cast<uint64_t>(offset);
  const uint64_t end = start + count;
  for (uint64_t page = start / kPageSize4K; page * kPageSize4K < end; ++page) {
    if (!IsFailingPage(page, permille_)) continue;
    const uint64_t bad = page * kPageSize4K;
    if (bad <= start) {
      failed_.fetch_add(1, std::memory_order_relaxed);
      return -EIO;
    }
    short_.fetch_add(1, std::memory_order_relaxed);
    return OsWrapper::Pread(fd, buf, static_cast<size_t>(bad - start), offset);
  }
  return OsWrapper::Pread(fd, buf, count, offset);
}

}  // namespace guestmem::soak
