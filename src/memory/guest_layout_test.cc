#include "guestmem/guest_layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace guestmem {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;
constexpr uint64_t k2M = kHugePageSize2M;

GuestRegion Region(uint64_t guest, uint64_t size, uint64_t file, uint64_t host,
                   uint64_t page_size = kPageSize4K) {
  return GuestRegion{GuestPhysAddr(guest), size, FileOffset(file), HostVirtAddr(host), page_size};
}

bool SameRegion(const GuestRegion& a, const GuestRegion& b) {
  return a.guest_addr == b.guest_addr && a.size == b.size && a.file_offset == b.file_offset &&
         a.host_addr == b.host_addr && a.page_size == b.page_size;
}

// x86 style: low memory below the MMIO hole, high memory above 4 GiB, each region in its own host
// mapping (the high one at the lower host address) and the file holding them back to back, as
// Firecracker writes it. The high region uses 2 MiB pages. Given out of guest order.
std::vector<GuestRegion> X86Regions() {
  return {Region(4 * kGiB, 1 * kGiB, 3 * kGiB, 0x7f0000000000, k2M),
          Region(0, 3 * kGiB, 0, 0x7f1000000000)};
}

// Checks every region of `layout` at its first and last byte in all three spaces (each finds it,
// and every translation lands on the same byte of the same region), and just outside it (no
// region, or the neighbouring region that touches it).
void ExpectConsistentTranslations(const GuestLayout& layout) {
  const std::vector<GuestRegion>& regions = layout.regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    SCOPED_TRACE("region " + std::to_string(i));
    const GuestRegion& r = regions[i];
    for (uint64_t offset : {uint64_t{0}, r.page_size - 1, r.page_size, r.size - 1}) {
      if (offset >= r.size) continue;
      SCOPED_TRACE("offset " + std::to_string(offset));
      const GuestPhysAddr guest(r.guest_addr.value() + offset);
      const HostVirtAddr host(r.host_addr.value() + offset);
      const FileOffset file(r.file_offset.value() + offset);
      for (const auto& hit :
           {layout.FindGuest(guest), layout.FindHost(host), layout.FindFile(file)}) {
        ASSERT_TRUE(hit.has_value());
        EXPECT_EQ(hit->region, i);
        EXPECT_EQ(hit->offset_in_region, offset);
      }
      EXPECT_EQ(layout.GuestToHost(guest), host);
      EXPECT_EQ(layout.GuestToFile(guest), file);
      EXPECT_EQ(layout.HostToGuest(host), guest);
      EXPECT_EQ(layout.HostToFile(host), file);
      EXPECT_EQ(layout.FileToHost(file), host);
    }
    // Just past the end and just before the start, in each space.
    auto expect_outside = [&](const std::optional<GuestLayout::Hit>& hit, uint64_t value,
                              auto start_of, bool before) {
      if (!hit) return;
      // Only a neighbour that touches this region may hold the address.
      ASSERT_NE(hit->region, i);
      const GuestRegion& other = regions[hit->region];
      EXPECT_EQ(start_of(other) + hit->offset_in_region, value);
      EXPECT_EQ(hit->offset_in_region, before ? other.size - 1 : 0);
    };
    auto guest_start = [](const GuestRegion& g) { return g.guest_addr.value(); };
    auto host_start = [](const GuestRegion& g) { return g.host_addr.value(); };
    auto file_start = [](const GuestRegion& g) { return g.file_offset.value(); };
    const uint64_t g_end = r.guest_addr.value() + r.size;
    const uint64_t h_end = r.host_addr.value() + r.size;
    const uint64_t f_end = r.file_offset.value() + r.size;
    expect_outside(layout.FindGuest(GuestPhysAddr(g_end)), g_end, guest_start, false);
    expect_outside(layout.FindHost(HostVirtAddr(h_end)), h_end, host_start, false);
    expect_outside(layout.FindFile(FileOffset(f_end)), f_end, file_start, false);
    if (r.guest_addr.value() > 0) {
      const uint64_t g = r.guest_addr.value() - 1;
      expect_outside(layout.FindGuest(GuestPhysAddr(g)), g, guest_start, true);
    }
    if (r.host_addr.value() > 0) {
      const uint64_t h = r.host_addr.value() - 1;
      expect_outside(layout.FindHost(HostVirtAddr(h)), h, host_start, true);
    }
    if (r.file_offset.value() > 0) {
      const uint64_t f = r.file_offset.value() - 1;
      expect_outside(layout.FindFile(FileOffset(f)), f, file_start, true);
    }
  }
}

TEST(GuestLayoutTest, X86LayoutWithMmioHole) {
  auto layout = GuestLayout::Create(X86Regions());
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  // Stored in guest order.
  ASSERT_EQ(layout->regions().size(), 2u);
  EXPECT_TRUE(SameRegion(layout->regions()[0], X86Regions()[1]));
  EXPECT_TRUE(SameRegion(layout->regions()[1], X86Regions()[0]));
  EXPECT_EQ(layout->total_size(), 4 * kGiB);
  EXPECT_EQ(layout->file_end(), 4 * kGiB);
  ExpectConsistentTranslations(*layout);

  // Low memory: first and last byte, and the hole after it.
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(0)), HostVirtAddr(0x7f1000000000));
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(3 * kGiB - 1)),
            HostVirtAddr(0x7f1000000000 + 3 * kGiB - 1));
  EXPECT_EQ(layout->GuestToFile(GuestPhysAddr(3 * kGiB - 1)), FileOffset(3 * kGiB - 1));
  for (uint64_t hole : {3 * kGiB, 3 * kGiB + 12345, 4 * kGiB - 1}) {
    EXPECT_FALSE(layout->FindGuest(GuestPhysAddr(hole))) << hole;
    EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(hole))) << hole;
    EXPECT_FALSE(layout->GuestToFile(GuestPhysAddr(hole))) << hole;
  }
  // High memory: continues the file where low memory ends.
  EXPECT_EQ(layout->GuestToFile(GuestPhysAddr(4 * kGiB)), FileOffset(3 * kGiB));
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(4 * kGiB)), HostVirtAddr(0x7f0000000000));
  EXPECT_EQ(layout->GuestToFile(GuestPhysAddr(5 * kGiB - 1)), FileOffset(4 * kGiB - 1));
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(5 * kGiB)));
  EXPECT_FALSE(layout->GuestToFile(GuestPhysAddr(UINT64_MAX)));
  // The file: the byte before 3 GiB is low memory's last, 3 GiB is high memory's first.
  EXPECT_EQ(layout->FileToHost(FileOffset(3 * kGiB - 1)),
            HostVirtAddr(0x7f1000000000 + 3 * kGiB - 1));
  EXPECT_EQ(layout->FileToHost(FileOffset(3 * kGiB)), HostVirtAddr(0x7f0000000000));
  EXPECT_FALSE(layout->FileToHost(FileOffset(4 * kGiB)));
  // The host: below, between and above the two mappings.
  EXPECT_FALSE(layout->HostToGuest(HostVirtAddr(0)));
  EXPECT_FALSE(layout->HostToGuest(HostVirtAddr(0x7f0000000000 - 1)));
  EXPECT_FALSE(layout->HostToGuest(HostVirtAddr(0x7f0000000000 + kGiB)));
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(0x7f1000000000 - 1)));
  EXPECT_EQ(layout->HostToGuest(HostVirtAddr(0x7f0000000000 + 7)), GuestPhysAddr(4 * kGiB + 7));
  EXPECT_EQ(layout->HostToFile(HostVirtAddr(0x7f1000000000 + 7)), FileOffset(7));
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(0x7f1000000000 + 3 * kGiB)));

  const auto hit = layout->FindHost(HostVirtAddr(0x7f0000000000 + 3 * kMiB + 5));
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->region, 1u);  // the index in regions(), not in the input
  EXPECT_EQ(hit->offset_in_region, 3 * kMiB + 5);
}

TEST(GuestLayoutTest, MixedPageSizesAndSparseFile) {
  // Three regions in three different orders per space, with gaps in every space, the file
  // holding them out of guest order and not back to back.
  std::vector<GuestRegion> input = {
      Region(64 * kMiB, 6 * kMiB, 0, 0x200000000, k2M),               // guest 2nd, file 1st
      Region(0, 64 * kKiB, 100 * kMiB, 0x300000000),                  // guest 1st, file 3rd
      Region(1 * kGiB, 4 * kMiB, 10 * kMiB, 0x100000000 + 4 * kKiB),  // guest 3rd, host 1st
  };
  auto layout = GuestLayout::Create(input);
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  ASSERT_EQ(layout->regions().size(), 3u);
  EXPECT_TRUE(SameRegion(layout->regions()[0], input[1]));
  EXPECT_TRUE(SameRegion(layout->regions()[1], input[0]));
  EXPECT_TRUE(SameRegion(layout->regions()[2], input[2]));
  EXPECT_EQ(layout->total_size(), 64 * kKiB + 6 * kMiB + 4 * kMiB);
  EXPECT_EQ(layout->file_end(), 100 * kMiB + 64 * kKiB);  // the furthest end, not the sum
  ExpectConsistentTranslations(*layout);
  EXPECT_FALSE(layout->FileToHost(FileOffset(6 * kMiB)));  // a hole in the file
  EXPECT_FALSE(layout->FileToHost(FileOffset(100 * kMiB - 1)));
  EXPECT_EQ(layout->FileToHost(FileOffset(10 * kMiB + 1)),
            HostVirtAddr(0x100000000 + 4 * kKiB + 1));
  EXPECT_FALSE(layout->HostToGuest(HostVirtAddr(0x100000000)));
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(64 * kKiB)));
}

TEST(GuestLayoutTest, OneRegion) {
  auto layout = GuestLayout::Create({Region(0, 4096, 0, 0x1000)});
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  ExpectConsistentTranslations(*layout);
  EXPECT_EQ(layout->total_size(), 4096u);
  EXPECT_EQ(layout->file_end(), 4096u);
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(0xfff)));
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(0x2000)));
  EXPECT_EQ(layout->HostToFile(HostVirtAddr(0x1fff)), FileOffset(0xfff));
}

TEST(GuestLayoutTest, RegionsAtTheTopOfTheAddressSpace) {
  // The highest page whose end still fits in 64 bits.
  const uint64_t top = UINT64_MAX - 2 * 4096 + 1;
  auto layout = GuestLayout::Create({Region(top, 4096, 0, top)});
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  EXPECT_EQ(layout->GuestToHost(GuestPhysAddr(top + 4095)), HostVirtAddr(top + 4095));
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(top + 4096)));
  EXPECT_FALSE(layout->GuestToHost(GuestPhysAddr(UINT64_MAX)));
  EXPECT_FALSE(layout->HostToFile(HostVirtAddr(top - 1)));
}

// Many regions in shuffled orders: every look-up agrees with a linear search.
TEST(GuestLayoutTest, ManyRegionsAgreeWithLinearSearch) {
  constexpr size_t kRegions = 257;
  std::vector<size_t> host_slot(kRegions);
  std::vector<size_t> file_slot(kRegions);
  for (size_t i = 0; i < kRegions; ++i) host_slot[i] = file_slot[i] = i;
  std::mt19937_64 rng(7);
  std::shuffle(host_slot.begin(), host_slot.end(), rng);
  std::shuffle(file_slot.begin(), file_slot.end(), rng);
  std::vector<GuestRegion> input;
  for (size_t i = 0; i < kRegions; ++i) {
    const uint64_t size = (1 + i % 3) * 64 * kKiB;
    input.push_back(Region(i * kMiB, size, file_slot[i] * 256 * kKiB,
                           0x7f0000000000 + host_slot[i] * kMiB + 4 * kKiB * (i % 5)));
  }
  std::shuffle(input.begin(), input.end(), rng);
  auto layout = GuestLayout::Create(input);
  ASSERT_TRUE(layout.has_value()) << layout.error().ToString();
  ExpectConsistentTranslations(*layout);
  const std::vector<GuestRegion>& regions = layout->regions();
  for (size_t k = 1; k < regions.size(); ++k) {
    ASSERT_LT(regions[k - 1].guest_addr, regions[k].guest_addr);
  }

  auto linear = [&](uint64_t value, auto start_of) -> std::optional<GuestLayout::Hit> {
    for (size_t i = 0; i < regions.size(); ++i) {
      const uint64_t start = start_of(regions[i]);
      if (value >= start && value - start < regions[i].size) {
        return GuestLayout::Hit{i, value - start};
      }
    }
    return std::nullopt;
  };
  auto same = [](const std::optional<GuestLayout::Hit>& a,
                 const std::optional<GuestLayout::Hit>& b) {
    return a.has_value() == b.has_value() &&
           (!a || (a->region == b->region && a->offset_in_region == b->offset_in_region));
  };
  for (int i = 0; i < 20000; ++i) {
    const uint64_t guest = rng() % (kRegions * kMiB + kMiB);
    const uint64_t host = 0x7f0000000000 - kMiB + rng() % (kRegions * kMiB + 2 * kMiB);
    const uint64_t file = rng() % (kRegions * 256 * kKiB + kMiB);
    ASSERT_TRUE(same(layout->FindGuest(GuestPhysAddr(guest)),
                     linear(guest, [](const GuestRegion& r) { return r.guest_addr.value(); })))
        << std::hex << guest;
    ASSERT_TRUE(same(layout->FindHost(HostVirtAddr(host)),
                     linear(host, [](const GuestRegion& r) { return r.host_addr.value(); })))
        << std::hex << host;
    ASSERT_TRUE(same(layout->FindFile(FileOffset(file)),
                     linear(file, [](const GuestRegion& r) { return r.file_offset.value(); })))
        << std::hex << file;
  }
}

// Create fails with `code`, and its message contains each of `fragments`.
void ExpectError(std::vector<GuestRegion> regions, ErrorCode code,
                 const std::vector<std::string>& fragments) {
  auto layout = GuestLayout::Create(std::move(regions));
  ASSERT_FALSE(layout.has_value());
  EXPECT_EQ(layout.error().code(), code) << layout.error().ToString();
  for (const std::string& fragment : fragments) {
    EXPECT_NE(layout.error().context().find(fragment), std::string::npos)
        << "\"" << fragment << "\" not in: " << layout.error().ToString();
  }
}

// Two good regions, then `bad` as region 2.
std::vector<GuestRegion> WithBadThird(GuestRegion bad) {
  return {Region(0, kMiB, 0, 0x10000000), Region(8 * kMiB, 2 * kMiB, 2 * kMiB, 0x20000000, k2M),
          bad};
}

TEST(GuestLayoutTest, RejectsNoRegions) {
  ExpectError({}, ErrorCode::kInvalidArgument, {"no regions"});
}

TEST(GuestLayoutTest, RejectsBadPageSize) {
  for (uint64_t page_size : {uint64_t{0}, uint64_t{512}, uint64_t{8192}, uint64_t{1} << 30}) {
    ExpectError(
        WithBadThird(Region(1 * kGiB, 1 * kGiB, 1 * kGiB, 0x40000000, page_size)),
        ErrorCode::kInvalidArgument,
        {"region 2: page size " + std::to_string(page_size) + " is neither 4096 nor 2097152"});
  }
}

TEST(GuestLayoutTest, RejectsZeroOrRaggedSize) {
  ExpectError(WithBadThird(Region(1 * kGiB, 0, 1 * kGiB, 0x40000000)), ErrorCode::kInvalidArgument,
              {"region 2: size is zero"});
  ExpectError(WithBadThird(Region(1 * kGiB, 4097, 1 * kGiB, 0x40000000)),
              ErrorCode::kInvalidArgument,
              {"region 2: size 0x1001 is not a multiple of its page size 4096"});
  ExpectError(WithBadThird(Region(1 * kGiB, 3 * kMiB, 1 * kGiB, 0x40000000, k2M)),
              ErrorCode::kInvalidArgument,
              {"region 2: size 0x300000 is not a multiple of its page size 2097152"});
}

TEST(GuestLayoutTest, RejectsUnalignedStarts) {
  ExpectError(WithBadThird(Region(1 * kGiB + 4096, 2 * kMiB, 1 * kGiB, 0x40000000, k2M)),
              ErrorCode::kInvalidArgument,
              {"region 2: guest address 0x40001000 is not aligned to its page size 2097152"});
  ExpectError(WithBadThird(Region(1 * kGiB, 2 * kMiB, 1 * kGiB, 0x7f0000001000, k2M)),
              ErrorCode::kInvalidArgument,
              {"region 2: host address 0x7f0000001000 is not aligned to its page size 2097152"});
  ExpectError(WithBadThird(Region(1 * kGiB, 2 * kMiB, 1 * kGiB + 4096, 0x40000000, k2M)),
              ErrorCode::kInvalidArgument,
              {"region 2: file offset 0x40001000 is not aligned to its page size 2097152"});
  ExpectError(WithBadThird(Region(1 * kGiB, 4096, 100, 0x40000000)), ErrorCode::kInvalidArgument,
              {"region 2: file offset 0x64 is not aligned to its page size 4096"});
  ExpectError(WithBadThird(Region(1 * kGiB + 1, 4096, 1 * kGiB, 0x40000000)),
              ErrorCode::kInvalidArgument, {"region 2: guest address 0x40000001 is not aligned"});
}

TEST(GuestLayoutTest, RejectsOverflow) {
  const uint64_t last_page = UINT64_MAX - 4095;
  ExpectError(WithBadThird(Region(last_page, 4096, 1 * kGiB, 0x40000000)), ErrorCode::kOutOfRange,
              {"region 2: guest address 0xfffffffffffff000 + size 0x1000 overflows"});
  ExpectError(WithBadThird(Region(1 * kGiB, 8192, 1 * kGiB, last_page - 4096)),
              ErrorCode::kOutOfRange,
              {"region 2: host address 0xffffffffffffe000 + size 0x2000 overflows"});
  ExpectError(WithBadThird(Region(1 * kGiB, 4096, last_page, 0x40000000)), ErrorCode::kOutOfRange,
              {"region 2: file offset 0xfffffffffffff000 + size 0x1000 overflows"});
  // A file offset past what off_t can hold.
  ExpectError(
      WithBadThird(Region(1 * kGiB, 2 * k2M, uint64_t{INT64_MAX} - k2M + 1, 0x40000000, k2M)),
      ErrorCode::kOutOfRange,
      {"region 2: file offset 0x7fffffffffe00000 + size 0x400000 overflows the largest "
       "file offset 0x7fffffffffffffff"});
}

TEST(GuestLayoutTest, RejectsOverlapInEachSpace) {
  // Regions 0 and 3 overlap; 1 and 2 overlap nothing. Each case overlaps in one space only.
  auto four = [](GuestRegion zero, GuestRegion three) {
    return std::vector<GuestRegion>{zero, Region(100 * kMiB, kMiB, 100 * kMiB, 0x60000000),
                                    Region(200 * kMiB, kMiB, 200 * kMiB, 0x70000000), three};
  };
  ExpectError(four(Region(0, 2 * kMiB, 0, 0x10000000), Region(kMiB, kMiB, 4 * kMiB, 0x20000000)),
              ErrorCode::kInvalidArgument,
              {"regions 0 and 3 overlap in guest addresses [0x100000, 0x200000)"});
  ExpectError(
      four(Region(0, 2 * kMiB, 0, 0x10100000), Region(4 * kMiB, 4 * kMiB, 4 * kMiB, 0x10000000)),
      ErrorCode::kInvalidArgument,
      {"regions 0 and 3 overlap in host addresses [0x10100000, 0x10300000)"});
  ExpectError(four(Region(0, 2 * kMiB, 0, 0x10000000), Region(4 * kMiB, kMiB, kMiB, 0x20000000)),
              ErrorCode::kInvalidArgument,
              {"regions 0 and 3 overlap in file offsets [0x100000, 0x200000)"});
  // One inside the other, and the very same start.
  ExpectError(
      four(Region(0, 64 * kMiB, 0, 0x10000000), Region(4 * kMiB, kMiB, 64 * kMiB, 0x20000000)),
      ErrorCode::kInvalidArgument,
      {"regions 0 and 3 overlap in guest addresses [0x400000, 0x500000)"});
  ExpectError(four(Region(0, kMiB, 0, 0x10000000), Region(4 * kMiB, 8 * kMiB, 0, 0x20000000)),
              ErrorCode::kInvalidArgument,
              {"regions 0 and 3 overlap in file offsets [0x0, 0x100000)"});
  // Overlap with a region given earlier in another order: still named by input index.
  ExpectError({Region(300 * kMiB, kMiB, 0, 0x10000000), Region(0, kMiB, kMiB, 0x20000000),
               Region(300 * kMiB + 4096, 4096, 2 * kMiB, 0x30000000)},
              ErrorCode::kInvalidArgument, {"regions 0 and 2 overlap in guest addresses"});
  // Touching is not overlapping, in any space.
  auto touching =
      GuestLayout::Create({Region(kMiB, kMiB, kMiB, 0x10100000), Region(0, kMiB, 0, 0x10000000)});
  ASSERT_TRUE(touching.has_value()) << touching.error().ToString();
  ExpectConsistentTranslations(*touching);
  EXPECT_EQ(touching->GuestToFile(GuestPhysAddr(kMiB)), FileOffset(kMiB));
  EXPECT_EQ(touching->HostToGuest(HostVirtAddr(0x10100000 - 1)), GuestPhysAddr(kMiB - 1));
}

}  // namespace
}  // namespace guestmem
