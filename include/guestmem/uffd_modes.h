// UffdModes: the userfaultfd registration modes, as a bit set. Shared by the userfaultfd layer
// (what to register) and the memory backends (what their mappings accept).
#ifndef GUESTMEM_UFFD_MODES_H_
#define GUESTMEM_UFFD_MODES_H_

#include <cstdint>

namespace guestmem {

enum class UffdModes : uint32_t {
  kNone = 0,
  kMissing = 1,       // a page with nothing behind it is touched
  kWriteProtect = 2,  // a write-protected page is written
  kMinor = 4,         // a page present in the page cache but not mapped is touched
};

constexpr UffdModes operator|(UffdModes a, UffdModes b) {
  return static_cast<UffdModes>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}
constexpr UffdModes operator&(UffdModes a, UffdModes b) {
  return static_cast<UffdModes>(static_cast<uint32_t>(a) & static_cast<uint32_t>(b));
}
constexpr bool HasMode(UffdModes set, UffdModes mode) { return (set & mode) == mode; }

}  // namespace guestmem

#endif  // GUESTMEM_UFFD_MODES_H_
