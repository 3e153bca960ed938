// FaultInjectionOs: an Os for tests that makes chosen system calls fail with a chosen errno.
//
//   FaultInjectionOs os;
//   os.FailNext(FaultInjectionOs::Call::kPwrite, EIO);      // the next pwrite fails with EIO
//   os.FailNext(FaultInjectionOs::Call::kIoctl, EAGAIN, 2, 3);  // 4th and 5th ioctl fail
//   auto file = MemoryFile::Create({.pages = 16, .os = &os});
//
// Every call not told to fail is forwarded to the target Os. Thread-safe.
#ifndef GUESTMEM_BASE_FAULT_INJECTION_OS_H_
#define GUESTMEM_BASE_FAULT_INJECTION_OS_H_

#include <array>
#include <cstdint>
#include <mutex>

#include "guestmem/os.h"

namespace guestmem {

class FaultInjectionOs : public OsWrapper {
 public:
  enum class Call {
    kRead, kPread, kPwrite, kLseek, kFallocate, kFtruncate, kOpen, kIoctl, kMmap, kMunmap,
    kMadvise, kMemfdCreate, kMemfdSecret, kUserfaultfd, kSendmsg, kRecvmsg,
    kCount_,  // number of calls; not a call
  };

  using OsWrapper::OsWrapper;

  // After `skip` further calls of `call` succeed, the next `times` fail with -err.
  void FailNext(Call call, int err, int times = 1, int skip = 0);
  // Every further call of `call` fails with -err until Clear().
  void FailAlways(Call call, int err) { FailNext(call, err, -1, 0); }
  void Clear();
  // How many times `call` was made (failed or not).
  uint64_t calls(Call call) const;

  ssize_t Read(int fd, void* buf, size_t count) override;
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override;
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override;
  off_t Lseek(int fd, off_t offset, int whence) override;
  int Fallocate(int fd, int mode, off_t offset, off_t length) override;
  int Ftruncate(int fd, off_t length) override;
  int Open(const char* path, int flags, mode_t mode) override;
  int Ioctl(int fd, unsigned long request, void* arg) override;
  int Mmap(void* hint, size_t length, int prot, int flags, int fd, off_t offset,
           void** out) override;
  int Munmap(void* addr, size_t length) override;
  int Madvise(void* addr, size_t length, int advice) override;
  int MemfdCreate(const char* name, unsigned int flags) override;
  int MemfdSecret(unsigned int flags) override;
  int Userfaultfd(int flags) override;
  ssize_t Sendmsg(int fd, const struct msghdr* msg, int flags) override;
  ssize_t Recvmsg(int fd, struct msghdr* msg, int flags) override;

 private:
  struct Rule {
    int err = 0;
    int64_t times = 0;  // failures left; -1 = forever
    int64_t skip = 0;   // successes before failing
    uint64_t calls = 0;
  };
  // Counts the call; returns -err if it must fail, 0 if it must go through.
  int Intercept(Call call);

  mutable std::mutex mu_;
  std::array<Rule, static_cast<size_t>(Call::kCount_)> rules_{};
};

}  // namespace guestmem

#endif  // GUESTMEM_BASE_FAULT_INJECTION_OS_H_
