#include "base/fault_injection_os.h"

namespace guestmem {

void FaultInjectionOs::FailNext(Call call, int err, int times, int skip) {
  std::lock_guard lock(mu_);
  Rule& rule = rules_[static_cast<size_t>(call)];
  rule.err = err;
  rule.times = times;
  rule.skip = skip;
}

void FaultInjectionOs::Clear() {
  std::lock_guard lock(mu_);
  for (Rule& rule : rules_) {
    rule.err = 0;
    rule.times = 0;
    rule.skip = 0;
  }
}

uint64_t FaultInjectionOs::calls(Call call) const {
  std::lock_guard lock(mu_);
  return rules_[static_cast<size_t>(call)].calls;
}

int FaultInjectionOs::Intercept(Call call) {
  std::lock_guard lock(mu_);
  Rule& rule = rules_[static_cast<size_t>(call)];
  ++rule.calls;
  if (rule.times == 0) return 0;
  if (rule.skip > 0) {
    --rule.skip;
    return 0;
  }
  if (rule.times > 0) --rule.times;
  return -rule.err;
}

#define GM_INTERCEPT(call)                  \
  if (int injected = Intercept(Call::call)) \
    return injected

ssize_t FaultInjectionOs::Read(int fd, void* buf, size_t count) {
  GM_INTERCEPT(kRead);
  return OsWrapper::Read(fd, buf, count);
}
ssize_t FaultInjectionOs::Pread(int fd, void* buf, size_t count, off_t offset) {
  GM_INTERCEPT(kPread);
  return OsWrapper::Pread(fd, buf, count, offset);
}
ssize_t FaultInjectionOs::Pwrite(int fd, const void* buf, size_t count, off_t offset) {
  GM_INTERCEPT(kPwrite);
  return OsWrapper::Pwrite(fd, buf, count, offset);
}
off_t FaultInjectionOs::Lseek(int fd, off_t offset, int whence) {
  GM_INTERCEPT(kLseek);
  return OsWrapper::Lseek(fd, offset, whence);
}
int FaultInjectionOs::Fallocate(int fd, int mode, off_t offset, off_t length) {
  GM_INTERCEPT(kFallocate);
  return OsWrapper::Fallocate(fd, mode, offset, length);
}
int FaultInjectionOs::Ftruncate(int fd, off_t length) {
  GM_INTERCEPT(kFtruncate);
  return OsWrapper::Ftruncate(fd, length);
}
int FaultInjectionOs::Open(const char* path, int flags, mode_t mode) {
  GM_INTERCEPT(kOpen);
  return OsWrapper::Open(path, flags, mode);
}
int FaultInjectionOs::Ioctl(int fd, unsigned long request, void* arg) {
  GM_INTERCEPT(kIoctl);
  return OsWrapper::Ioctl(fd, request, arg);
}
int FaultInjectionOs::Mmap(void* hint, size_t length, int prot, int flags, int fd, off_t offset,
                           void** out) {
  GM_INTERCEPT(kMmap);
  return OsWrapper::Mmap(hint, length, prot, flags, fd, offset, out);
}
int FaultInjectionOs::Munmap(void* addr, size_t length) {
  GM_INTERCEPT(kMunmap);
  return OsWrapper::Munmap(addr, length);
}
int FaultInjectionOs::Madvise(void* addr, size_t length, int advice) {
  GM_INTERCEPT(kMadvise);
  return OsWrapper::Madvise(addr, length, advice);
}
int FaultInjectionOs::MemfdCreate(const char* name, unsigned int flags) {
  GM_INTERCEPT(kMemfdCreate);
  return OsWrapper::MemfdCreate(name, flags);
}
int FaultInjectionOs::MemfdSecret(unsigned int flags) {
  GM_INTERCEPT(kMemfdSecret);
  return OsWrapper::MemfdSecret(flags);
}
int FaultInjectionOs::Userfaultfd(int flags) {
  GM_INTERCEPT(kUserfaultfd);
  return OsWrapper::Userfaultfd(flags);
}
ssize_t FaultInjectionOs::Sendmsg(int fd, const struct msghdr* msg, int flags) {
  GM_INTERCEPT(kSendmsg);
  return OsWrapper::Sendmsg(fd, msg, flags);
}
ssize_t FaultInjectionOs::Recvmsg(int fd, struct msghdr* msg, int flags) {
  GM_INTERCEPT(kRecvmsg);
  return OsWrapper::Recvmsg(fd, msg, flags);
}

#undef GM_INTERCEPT

}  // namespace guestmem
