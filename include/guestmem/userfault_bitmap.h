// UserfaultBitmap: the KVM userfault bitmap of a secret-hiding VM (Firecracker's
// feature/secret-hiding branch; see its protocol in the project's docs).
//
// One bit per 4 KiB page of the guest memory file (guest_memfd), least significant bit first:
// page i is bit i % 8 of byte i / 8 (bit i % 64 of little-endian word i / 64). A set bit tells KVM
// that the page is not populated yet: a guest access to it exits to the VMM, which asks the
// handler. The VMM sets every bit before the handler serves; the handler clears a page's bit only
// after the page's content is in the guest memory file — never before (KVM would map a zero page)
// — and never sets one.
//
// The bitmap is a memfd the VMM sends; it is mapped MAP_SHARED at the memfd's size.
//
// Thread safety: every method may be called from any thread; clearing is an atomic
// read-modify-write with release order, so that KVM (and any thread) that sees a bit clear also
// sees the content written before.
#ifndef GUESTMEM_USERFAULT_BITMAP_H_
#define GUESTMEM_USERFAULT_BITMAP_H_

#include <cstdint>
#include <memory>

#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

class UserfaultBitmap {
 public:
  // Maps `memfd`, which must hold at least one bit per page of a guest memory file of
  // `memory_bytes` (memory_bytes / 4096 / 8 bytes, as Firecracker sizes it).
  // ERRORS: kInvalidArgument for a memfd too small or larger than 1 bit per page needs
  // (rounded up to a page), or a memory size not a multiple of 32 KiB; what fstat and mmap report.
  static Result<std::unique_ptr<UserfaultBitmap>> Map(UniqueFd memfd, uint64_t memory_bytes,
                                                      Os* os = nullptr);

  uint64_t page_count() const { return page_count_; }
  int fd() const { return memfd_.get(); }

  // REQUIRES: page < page_count(); first + count <= page_count().
  bool IsSet(uint64_t page) const;
  void Clear(uint64_t first, uint64_t count);
  uint64_t CountSet(uint64_t first, uint64_t count) const;

 private:
  UserfaultBitmap(UniqueFd memfd, Mapping mapping, uint64_t page_count)
      : memfd_(std::move(memfd)), mapping_(std::move(mapping)), page_count_(page_count) {}
  uint64_t* words() const { return static_cast<uint64_t*>(mapping_.data()); }

  UniqueFd memfd_;
  Mapping mapping_;
  uint64_t page_count_;
};

}  // namespace guestmem

#endif  // GUESTMEM_USERFAULT_BITMAP_H_
