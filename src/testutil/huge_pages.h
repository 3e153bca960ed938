// HugePageReservation: raises vm.nr_hugepages so that `pages` more 2 MiB pages are free for one
// test, and puts the old value back on destruction. It holds an exclusive lock on the sysctl file
// meanwhile, so that tests doing the same in other processes (ctest runs them in parallel) take
// turns instead of undoing each other's reservation.
//
// Thread safety: a value owned by one test.
#ifndef GUESTMEM_TESTUTIL_HUGE_PAGES_H_
#define GUESTMEM_TESTUTIL_HUGE_PAGES_H_

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

namespace guestmem::testutil {

// A "Key: value" line of /proc/meminfo; 0 if absent.
inline uint64_t ReadMeminfo(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  uint64_t value = 0;
  std::string rest;
  while (in >> name >> value) {
    if (name == key + ":") return value;
    std::getline(in, rest);
  }
  return 0;
}

class HugePageReservation {
 public:
  explicit HugePageReservation(uint64_t pages) {
    fd_ = open("/proc/sys/vm/nr_hugepages", O_RDWR | O_CLOEXEC);
    if (fd_ < 0) {
      why_ = "cannot open vm.nr_hugepages: " + std::string(strerror(errno));
      return;
    }
    flock(fd_, LOCK_EX);
    old_ = ReadValue();
    if (!WriteValue(old_ + pages)) {
      why_ = "cannot raise vm.nr_hugepages: " + std::string(strerror(errno));
      return;
    }
    changed_ = true;
    const uint64_t free_pages = ReadMeminfo("HugePages_Free");
    if (free_pages < pages) {
      why_ = "only " + std::to_string(free_pages) + " free 2 MiB pages after raising " +
             "vm.nr_hugepages to " + std::to_string(old_ + pages);
    }
  }
  HugePageReservation(const HugePageReservation&) = delete;
  HugePageReservation& operator=(const HugePageReservation&) = delete;
  ~HugePageReservation() {
    if (changed_) WriteValue(old_);
    if (fd_ >= 0) close(fd_);  // also drops the lock
  }

  bool ok() const { return why_.empty(); }
  // Why the pages could not be reserved; empty when ok().
  const std::string& why() const { return why_; }

 private:
  uint64_t ReadValue() const {
    char buf[32] = {};
    const ssize_t n = pread(fd_, buf, sizeof(buf) - 1, 0);
    return n > 0 ? std::stoull(std::string(buf, static_cast<size_t>(n))) : 0;
  }
  bool WriteValue(uint64_t value) const {
    const std::string text = std::to_string(value);
    return pwrite(fd_, text.data(), text.size(), 0) == static_cast<ssize_t>(text.size());
  }

  int fd_ = -1;
  uint64_t old_ = 0;
  bool changed_ = false;
  std::string why_;
};

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_HUGE_PAGES_H_
