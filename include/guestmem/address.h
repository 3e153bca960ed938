// Strong address types for the three address spaces guestmem translates between:
//   GuestPhysAddr - where the guest sees memory (guest physical address),
//   HostVirtAddr  - where the VMM process maps it (host virtual address),
//   FileOffset    - where its content lives in a memory file or snapshot.
// They do not convert into each other implicitly; arithmetic that could wrap is checked and
// returns std::nullopt on overflow instead of wrapping.
//
// Thread safety: value types.
#ifndef GUESTMEM_ADDRESS_H_
#define GUESTMEM_ADDRESS_H_

#include <compare>
#include <cstdint>
#include <optional>

namespace guestmem {

inline constexpr uint64_t kPageSize4K = 4096;
inline constexpr uint64_t kHugePageSize2M = uint64_t{2} << 20;

constexpr bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }
// REQUIRES: IsPowerOfTwo(alignment).
constexpr bool IsAligned(uint64_t v, uint64_t alignment) { return (v & (alignment - 1)) == 0; }
constexpr uint64_t AlignDown(uint64_t v, uint64_t alignment) { return v & ~(alignment - 1); }
// std::nullopt if rounding up would overflow.
constexpr std::optional<uint64_t> AlignUp(uint64_t v, uint64_t alignment) {
  uint64_t down = AlignDown(v, alignment);
  if (down == v) return v;
  if (down > UINT64_MAX - alignment) return std::nullopt;
  return down + alignment;
}
constexpr std::optional<uint64_t> CheckedAdd(uint64_t a, uint64_t b) {
  if (a > UINT64_MAX - b) return std::nullopt;
  return a + b;
}

template <typename Tag>
class Address {
 public:
  constexpr Address() = default;
  constexpr explicit Address(uint64_t value) : value_(value) {}

  constexpr uint64_t value() const { return value_; }

  // this + bytes, or std::nullopt on overflow.
  constexpr std::optional<Address> CheckedAdd(uint64_t bytes) const {
    auto sum = guestmem::CheckedAdd(value_, bytes);
    if (!sum) return std::nullopt;
    return Address(*sum);
  }
  // this - base in bytes, or std::nullopt if base > this.
  constexpr std::optional<uint64_t> CheckedOffsetFrom(Address base) const {
    if (base.value_ > value_) return std::nullopt;
    return value_ - base.value_;
  }
  // Unchecked: REQUIRES the caller has proven the result is in range.
  constexpr Address UncheckedAdd(uint64_t bytes) const { return Address(value_ + bytes); }

  constexpr bool IsAligned(uint64_t alignment) const {
    return guestmem::IsAligned(value_, alignment);
  }
  constexpr Address AlignDown(uint64_t alignment) const {
    return Address(guestmem::AlignDown(value_, alignment));
  }

  friend constexpr auto operator<=>(Address, Address) = default;

 private:
  uint64_t value_ = 0;
};

struct GuestPhysTag {};
struct HostVirtTag {};
struct FileOffsetTag {};

using GuestPhysAddr = Address<GuestPhysTag>;
using HostVirtAddr = Address<HostVirtTag>;
using FileOffset = Address<FileOffsetTag>;

}  // namespace guestmem

#endif  // GUESTMEM_ADDRESS_H_
