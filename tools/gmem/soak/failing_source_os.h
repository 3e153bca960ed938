// FailingSourceOs: the soak's I/O error injection, through the Os seam of the page source.
//
// Reading a snapshot page in the failing set (IsFailingPage) fails the way a disk with a bad
// sector does: a pread that starts on a failing page returns -EIO; one that starts before it
// returns the bytes up to it (a short read), so the caller's retry of the rest then fails. Every
// other call goes to the target Os. Whatever a handler does, the bytes of a failing page never
// reach it.
//
// Thread safety: safe from any number of threads (the fault engine's workers share a source).
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_FAILING_SOURCE_OS_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_FAILING_SOURCE_OS_H_

#include <atomic>
#include <cstdint>

#include "guestmem/os.h"

namespace guestmem::soak {

class FailingSourceOs : public OsWrapper {
 public:
  explicit FailingSourceOs(uint32_t permille, Os* target = Os::Default())
      : OsWrapper(target), permille_(permille) {}

  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override;

  // preads that failed with EIO, and that were cut short before a failing page.
  uint64_t failed_reads() const { return failed_.load(std::memory_order_relaxed); }
  uint64_t short_reads() const { return short_.load(std::memory_order_relaxed); }

 private:
  const uint32_t permille_;
  std::atomic<uint64_t> failed_{0};
  std::atomic<uint64_t> short_{0};
};

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_FAILING_SOURCE_OS_H_
