// Whether a 4 KiB page holds only zeros: one pass the compiler vectorises (OR of its words).
#ifndef GUESTMEM_BASE_ZERO_PAGE_H_
#define GUESTMEM_BASE_ZERO_PAGE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace guestmem {

inline bool IsZeroPage(const std::byte* page) {
  uint64_t any = 0;
  for (uint64_t i = 0; i < 4096; i += sizeof(uint64_t)) {
    uint64_t word;
    std::memcpy(&word, page + i, sizeof(word));
    any |= word;
  }
  return any == 0;
}

}  // namespace guestmem

#endif  // GUESTMEM_BASE_ZERO_PAGE_H_
