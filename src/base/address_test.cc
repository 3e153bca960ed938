#include "guestmem/address.h"

#include <gtest/gtest.h>

#include <type_traits>

namespace guestmem {
namespace {

TEST(AddressTest, CheckedArithmeticRefusesOverflow) {
  FileOffset off(UINT64_MAX - 10);
  EXPECT_EQ(off.CheckedAdd(10)->value(), UINT64_MAX);
  EXPECT_FALSE(off.CheckedAdd(11).has_value());
  EXPECT_EQ(FileOffset(100).CheckedOffsetFrom(FileOffset(40)), 60u);
  EXPECT_FALSE(FileOffset(40).CheckedOffsetFrom(FileOffset(100)).has_value());
}

TEST(AddressTest, Alignment) {
  EXPECT_TRUE(GuestPhysAddr(0x200000).IsAligned(kHugePageSize2M));
  EXPECT_FALSE(GuestPhysAddr(0x201000).IsAligned(kHugePageSize2M));
  EXPECT_EQ(HostVirtAddr(0x1fff).AlignDown(kPageSize4K).value(), 0x1000u);
  EXPECT_EQ(AlignUp(0x1001, kPageSize4K), 0x2000u);
  EXPECT_EQ(AlignUp(0x1000, kPageSize4K), 0x1000u);
  EXPECT_FALSE(AlignUp(UINT64_MAX - 5, kPageSize4K).has_value());
  EXPECT_TRUE(IsPowerOfTwo(4096));
  EXPECT_FALSE(IsPowerOfTwo(0));
  EXPECT_FALSE(IsPowerOfTwo(4097));
}

TEST(AddressTest, SpacesDoNotMix) {
  static_assert(!std::is_convertible_v<GuestPhysAddr, HostVirtAddr>);
  static_assert(!std::is_convertible_v<FileOffset, GuestPhysAddr>);
  static_assert(!std::is_convertible_v<uint64_t, FileOffset>);
  EXPECT_LT(GuestPhysAddr(1), GuestPhysAddr(2));
}

}  // namespace
}  // namespace guestmem
