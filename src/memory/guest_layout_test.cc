#include "guestmem/guest_layout.h"

#include <gtest/gtest.h>

namespace guestmem {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

GuestRegion Region(uint64_t guest, uint64_t size, uint64_t file, uint64_t host,
                   uint64_t page = kPageSize4K) {
  return GuestRegion{GuestPhysAddr(guest), size, FileOffset(file), HostVirtAddr(host), page};
}

// x86-like: low memory below the MMIO hole, high memory above 4 GiB; host order reversed.
std::vector<GuestRegion> X86Regions() {
  return {Region(4 * kGiB, 64 * kMiB, 32 * kMiB, 0x7f0000000000, kHugePageSize2M),
          Region(0, 32 * kMiB, 0, 0x7f1000000000)};
}

TEST(GuestLayoutTest, SortsByGuestAndTranslates) {
  auto layout = GuestLayout::Create(X86Regions());
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  ASSERT_EQ(layout->regions().size(), 2u);
  EXPECT_EQ(layout->regions()[0].guest_addr.value(), 0u);
  EXPECT_EQ(layout->total_size(), 96 * kMiB);
  EXPECT_EQ(layout->file_end(), 96 * kMiB);

  // First and last byte of each region, and just outside.
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(0))->value(), 0x7f1000000000u);
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(32 * kMiB - 1))->value(), 0x7f1000000000u + 32 * kMiB - 1);
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(32 * kMiB)));        // the MMIO gap
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(4 * kGiB - 1)));
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(4 * kGiB))->value(), 0x7f0000000000u);
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(4 * kGiB + 64 * kMiB)));

  EXPECT_EQ(layout->HostToFile(HostVirtAddr(0x7f0000000000 + 5))->value(), 32 * kMiB + 5);
  EXPECT_EQ(layout->FileToHost(FileOffset(32 * kMiB - 1))->value(), 0x7f1000000000u + 32 * kMiB - 1);
  EXPECT_EQ(layout->HostToGuest(HostVirtAddr(0x7f1000000000 + 7))->value(), 7u);
  EXPECT_EQ(layout->GuestToFile(GuestPhysAddr(4 * kGiB + 9))->value(), 32 * kMiB + 9);
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(0x7f0000000000 - 1)));
  EXPECT_FALSE(layout->FileToHost(FileOffset(96 * kMiB)));
  auto hit = layout->FindHost(HostVirtAddr(0x7f0000000000 + 3 * kMiB));
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->region, 1u);
  EXPECT_EQ(hit->offset_in_region, 3 * kMiB);
}

void ExpectError(std::vector<GuestRegion> regions, ErrorCode code, const std::string& fragment) {
  auto layout = GuestLayout::Create(std::move(regions));
  ASSERT_FALSE(layout.has_value());
  EXPECT_EQ(layout.error().code(), code) << layout.error().ToString();
  EXPECT_NE(layout.error().context().find(fragment), std::string::npos) << layout.error().ToString();
}

TEST(GuestLayoutTest, RejectsBadRegionsNamingThem) {
  ExpectError({}, ErrorCode::kInvalidArgument, "no regions");
  ExpectError({Region(0, kMiB, 0, 0x1000, 8192)}, ErrorCode::kInvalidArgument, "region 0: page size 8192");
  ExpectError({Region(0, 0, 0, 0x1000)}, ErrorCode::kInvalidArgument, "size is zero");
  ExpectError({Region(0, 4096, 0, 0x1000), Region(kMiB, 4097, 4096, 0x100000)},
              ErrorCode::kInvalidArgument, "region 1: size 0x1001");
  ExpectError({Region(0, kMiB, 0, 0x7f0000001000, kHugePageSize2M)}, ErrorCode::kInvalidArgument,
              "region 0: size 0x100000 is not a multiple");
  ExpectError({Region(0, 2 * kMiB, 0, 0x7f0000001000, kHugePageSize2M)},
              ErrorCode::kInvalidArgument, "0x7f0000001000 in host virtual addresses is not aligned");
  ExpectError({Region(0, 4096, 100, 0x1000)}, ErrorCode::kInvalidArgument, "in file offsets is not aligned");
  ExpectError({Region(UINT64_MAX - 4095, 8192, 0, 0x1000)}, ErrorCode::kOutOfRange, "overflows");
}

TEST(GuestLayoutTest, RejectsOverlapInAnySpace) {
  ExpectError({Region(0, 2 * kMiB, 0, 0x10000000), Region(kMiB, kMiB, 4 * kMiB, 0x20000000)},
              ErrorCode::kInvalidArgument, "overlap in guest physical addresses");
  ExpectError({Region(0, 2 * kMiB, 0, 0x10000000), Region(4 * kMiB, kMiB, 4 * kMiB, 0x10100000)},
              ErrorCode::kInvalidArgument, "overlap in host virtual addresses");
  ExpectError({Region(0, 2 * kMiB, 0, 0x10000000), Region(4 * kMiB, kMiB, kMiB, 0x20000000)},
              ErrorCode::kInvalidArgument, "overlap in file offsets");
  // Touching is not overlapping.
  EXPECT_TRUE(GuestLayout::Create({Region(0, kMiB, 0, 0x10000000),
                                   Region(kMiB, kMiB, kMiB, 0x10100000)}).has_value());
}

TEST(GuestLayoutTest, ManyRegionsLookUp) {
  std::vector<GuestRegion> regions;
  for (uint64_t i = 0; i < 100; ++i) {
    // Shuffled host order, gaps everywhere.
    regions.push_back(Region(i * 2 * kMiB, kMiB, i * kMiB, 0x7f0000000000 + ((i * 37) % 100) * 4 * kMiB));
  }
  auto layout = GuestLayout::Create(regions);
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  for (uint64_t i = 0; i < 100; ++i) {
    const uint64_t host = 0x7f0000000000 + ((i * 37) % 100) * 4 * kMiB;
    EXPECT_EQ(layout->HostToFile(HostVirtAddr(host + 4096))->value(), i * kMiB + 4096);
    EXPECT_FALSE(layout->HostToFile(HostVirtAddr(host + kMiB)));  // the gap after it
    EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(i * 2 * kMiB))->value(), host);
  }
}

}  // namespace
}  // namespace guestmem
