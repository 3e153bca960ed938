#include "guestmem/mapping.h"

#include <sys/mman.h>

#include <string>

#include "guestmem/os.h"

namespace guestmem {

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    reset();
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void Mapping::reset() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

Result<Mapping> Mapping::Map(size_t size, int prot, int flags, int fd, off_t offset, void* hint,
                             Os* os) {
  if (size == 0) return Error(ErrorCode::kInvalidArgument, "mmap: zero length");
  if (os == nullptr) os = Os::Default();
  void* addr = nullptr;
  int rc = os->Mmap(hint, size, prot, flags, fd, offset, &addr);
  if (rc < 0) {
    return PosixError(-rc, "mmap " + std::to_string(size) + " bytes of fd " + std::to_string(fd) +
                               " at offset " + std::to_string(offset));
  }
  return Mapping(addr, size);
}

Result<Mapping> Mapping::Anonymous(size_t size, int extra_flags, Os* os) {
  return Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0,
             nullptr, os);
}

}  // namespace guestmem
