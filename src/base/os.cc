// The real kernel behind Os::Default().
#include "guestmem/os.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace guestmem {
namespace {

#ifndef SYS_memfd_secret
constexpr long kSysMemfdSecret = 447;
#else
constexpr long kSysMemfdSecret = SYS_memfd_secret;
#endif

// Maps the libc convention (-1 + errno) to ours (-errno).
template <typename T>
T Check(T rc) {
  return rc < 0 ? static_cast<T>(-errno) : rc;
}

// Retries a call interrupted by a signal before it did anything.
template <typename Fn>
auto Restart(Fn fn) {
  decltype(fn()) rc;
  do {
    rc = fn();
  } while (rc < 0 && errno == EINTR);
  return Check(rc);
}

class PosixOs final : public Os {
 public:
  ssize_t Read(int fd, void* buf, size_t count) override {
    return Restart([&] { return ::read(fd, buf, count); });
  }
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    return Restart([&] { return ::pread(fd, buf, count, offset); });
  }
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    return Restart([&] { return ::pwrite(fd, buf, count, offset); });
  }
  off_t Lseek(int fd, off_t offset, int whence) override {
    return Check(::lseek(fd, offset, whence));
  }
  int Fallocate(int fd, int mode, off_t offset, off_t length) override {
    return Restart([&] { return ::fallocate(fd, mode, offset, length); });
  }
  int Ftruncate(int fd, off_t length) override {
    return Restart([&] { return ::ftruncate(fd, length); });
  }
  int Open(const char* path, int flags, mode_t mode) override {
    return Restart([&] { return ::open(path, flags, mode); });
  }
  int Ioctl(int fd, unsigned long request, void* arg) override {
    return Check(::ioctl(fd, request, arg));
  }
  int Mmap(void* hint, size_t length, int prot, int flags, int fd, off_t offset,
           void** out) override {
    void* addr = ::mmap(hint, length, prot, flags, fd, offset);
    if (addr == MAP_FAILED) return -errno;
    *out = addr;
    return 0;
  }
  int Munmap(void* addr, size_t length) override { return Check(::munmap(addr, length)); }
  int Madvise(void* addr, size_t length, int advice) override {
    return Check(::madvise(addr, length, advice));
  }
  int MemfdCreate(const char* name, unsigned int flags) override {
    return Check(::memfd_create(name, flags));
  }
  int MemfdSecret(unsigned int flags) override {
    return static_cast<int>(Check(::syscall(kSysMemfdSecret, flags)));
  }
  int Userfaultfd(int flags) override {
    return static_cast<int>(Check(::syscall(SYS_userfaultfd, flags)));
  }
  ssize_t Sendmsg(int fd, const struct msghdr* msg, int flags) override {
    return Restart([&] { return ::sendmsg(fd, msg, flags); });
  }
  ssize_t Recvmsg(int fd, struct msghdr* msg, int flags) override {
    return Restart([&] { return ::recvmsg(fd, msg, flags); });
  }
};

}  // namespace

Os* Os::Default() {
  static PosixOs* const kOs = new PosixOs();  // never destroyed: usable from static destructors
  return kOs;
}

}  // namespace guestmem
