// Mapping: sole owner of an mmap'ed address range; unmaps it on destruction. Move-only.
//
// Thread safety: the owner object is not synchronized; the memory it maps may be shared freely.
#ifndef GUESTMEM_MAPPING_H_
#define GUESTMEM_MAPPING_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include "guestmem/result.h"

namespace guestmem {

class Os;

class Mapping {
 public:
  Mapping() = default;
  // Adopts an existing mapping of `size` bytes at `addr`.
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  Mapping(Mapping&& other) noexcept
      : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  // mmap(2) through `os` (Os::Default() when null). `size` must be non-zero.
  static Result<Mapping> Map(size_t size, int prot, int flags, int fd, off_t offset,
                             void* hint = nullptr, Os* os = nullptr);
  // A private anonymous read-write mapping; `extra_flags` are or'ed in (MAP_NORESERVE, ...).
  static Result<Mapping> Anonymous(size_t size, int extra_flags = 0, Os* os = nullptr);

  void* data() const { return addr_; }
  std::byte* bytes() const { return static_cast<std::byte*>(addr_); }
  uint64_t address() const { return reinterpret_cast<uint64_t>(addr_); }
  size_t size() const { return size_; }
  std::span<std::byte> span() const { return {bytes(), size_}; }
  bool valid() const { return addr_ != nullptr; }

  // Gives up ownership without unmapping.
  std::pair<void*, size_t> release() {
    return {std::exchange(addr_, nullptr), std::exchange(size_, 0)};
  }
  void reset();

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_MAPPING_H_
