// Os: the one seam between guestmem and the kernel.
//
// Every system call guestmem makes on a path that tests need to fail on purpose goes through an
// Os (a short read of a snapshot, ENOMEM from fallocate, EAGAIN from a uffd ioctl...). Production
// code uses Os::Default(), which calls the kernel directly. Tests derive from OsWrapper, override
// the calls they want to break, and forward the rest (see src/base/fault_injection_os.h).
//
// Convention (as in liburing): every method returns >= 0 on success and -errno on failure, and
// never leaves the caller to read errno. Turn a negative return into an Error with PosixError().
//
// Thread safety: Os::Default() is stateless and safe from any thread. Implementations used by the
// fault engine must be thread-safe.
#ifndef GUESTMEM_OS_H_
#define GUESTMEM_OS_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

struct msghdr;

namespace guestmem {

class Os {
 public:
  virtual ~Os() = default;

  // The process-wide real kernel. Never null, never destroyed.
  static Os* Default();

  virtual ssize_t Read(int fd, void* buf, size_t count) = 0;
  virtual ssize_t Pread(int fd, void* buf, size_t count, off_t offset) = 0;
  virtual ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) = 0;
  virtual off_t Lseek(int fd, off_t offset, int whence) = 0;
  virtual int Fallocate(int fd, int mode, off_t offset, off_t length) = 0;
  virtual int Ftruncate(int fd, off_t length) = 0;
  virtual int Open(const char* path, int flags, mode_t mode) = 0;
  virtual int Ioctl(int fd, unsigned long request, void* arg) = 0;

  // On success stores the mapping's address in *out and returns 0.
  virtual int Mmap(void* hint, size_t length, int prot, int flags, int fd, off_t offset,
                   void** out) = 0;
  virtual int Munmap(void* addr, size_t length) = 0;
  virtual int Madvise(void* addr, size_t length, int advice) = 0;

  virtual int MemfdCreate(const char* name, unsigned int flags) = 0;
  virtual int MemfdSecret(unsigned int flags) = 0;  // syscall 447; no glibc wrapper
  virtual int Userfaultfd(int flags) = 0;           // the syscall, not /dev/userfaultfd

  virtual ssize_t Sendmsg(int fd, const struct msghdr* msg, int flags) = 0;
  virtual ssize_t Recvmsg(int fd, struct msghdr* msg, int flags) = 0;
};

// Forwards every call to a target Os; derive from it to override only what a test breaks.
class OsWrapper : public Os {
 public:
  explicit OsWrapper(Os* target = Os::Default()) : target_(target) {}
  Os* target() const { return target_; }

  ssize_t Read(int fd, void* buf, size_t count) override { return target_->Read(fd, buf, count); }
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    return target_->Pread(fd, buf, count, offset);
  }
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    return target_->Pwrite(fd, buf, count, offset);
  }
  off_t Lseek(int fd, off_t offset, int whence) override {
    return target_->Lseek(fd, offset, whence);
  }
  int Fallocate(int fd, int mode, off_t offset, off_t length) override {
    return target_->Fallocate(fd, mode, offset, length);
  }
  int Ftruncate(int fd, off_t length) override { return target_->Ftruncate(fd, length); }
  int Open(const char* path, int flags, mode_t mode) override {
    return target_->Open(path, flags, mode);
  }
  int Ioctl(int fd, unsigned long request, void* arg) override {
    return target_->Ioctl(fd, request, arg);
  }
  int Mmap(void* hint, size_t length, int prot, int flags, int fd, off_t offset,
           void** out) override {
    return target_->Mmap(hint, length, prot, flags, fd, offset, out);
  }
  int Munmap(void* addr, size_t length) override { return target_->Munmap(addr, length); }
  int Madvise(void* addr, size_t length, int advice) override {
    return target_->Madvise(addr, length, advice);
  }
  int MemfdCreate(const char* name, unsigned int flags) override {
    return target_->MemfdCreate(name, flags);
  }
  int MemfdSecret(unsigned int flags) override { return target_->MemfdSecret(flags); }
  int Userfaultfd(int flags) override { return target_->Userfaultfd(flags); }
  ssize_t Sendmsg(int fd, const struct msghdr* msg, int flags) override {
    return target_->Sendmsg(fd, msg, flags);
  }
  ssize_t Recvmsg(int fd, struct msghdr* msg, int flags) override {
    return target_->Recvmsg(fd, msg, flags);
  }

 private:
  Os* target_;
};

}  // namespace guestmem

#endif  // GUESTMEM_OS_H_
