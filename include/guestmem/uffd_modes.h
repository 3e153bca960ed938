// UffdModes: the userfaultfd registration modes as a bit set. Shared by the userfaultfd layer
// (what to register a range in) and the memory backends (which modes their mappings accept).
//
//   kMissing       a page with nothing behind it is touched (answer: COPY, ZEROPAGE, or for
//                  file-backed memory write the file then CONTINUE);
//   kWriteProtect  a write-protected page is written (answer: WRITEPROTECT off);
//   kMinor         a page present in the page cache but not mapped is touched (answer: CONTINUE).
//
// Thread safety: a value type.
#ifndef GUESTMEM_UFFD_MODES_H_
#define GUESTMEM_UFFD_MODES_H_

#include <cstdint>

namespace guestmem {

enum class UffdModes : uint32_t {
  kNone = 0,
  kMissing = 1,
  kWriteProtect = 2,
  kMinor = 4,
};

constexpr UffdModes operator|(UffdModes a, UffdModes b) {
  return static_cast<UffdModes>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}
constexpr UffdModes operator&(UffdModes a, UffdModes b) {
  return static_cast<UffdModes>(static_cast<uint32_t>(a) & static_cast<uint32_t>(b));
}
constexpr UffdModes& operator|=(UffdModes& a, UffdModes b) { return a = a | b; }

// True if every mode of `modes` is in `set` (so HasMode(set, kNone) is always true).
constexpr bool HasMode(UffdModes set, UffdModes modes) { return (set & modes) == modes; }

}  // namespace guestmem

#endif  // GUESTMEM_UFFD_MODES_H_
