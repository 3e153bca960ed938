#include "guestmem/address_registry.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "guestmem/memory_file.h"

namespace guestmem {
namespace {

using ::testing::HasSubstr;

std::shared_ptr<MemoryFile> MakeFile(uint64_t pages) {
  auto file = MemoryFile::Create({.size_bytes = pages * kPageSize4K, .name = "registry-test"});
  EXPECT_TRUE(file.has_value()) << file.error().ToString();
  return file ? *file : nullptr;
}

// A registry of its own: made-up addresses, exact edges.
TEST(AddressRegistryTest, FindsInsideAndAtTheEdgesOnly) {
  AddressRegistry registry;
  auto a = MakeFile(1);
  auto b = MakeFile(1);
  ASSERT_TRUE(registry.Register(HostVirtAddr(0x10000), 0x4000, a, FileOffset(0x2000)));
  ASSERT_TRUE(registry.Register(HostVirtAddr(0x14000), 0x1000, b, FileOffset(0)));  // adjacent
  ASSERT_TRUE(registry.Register(HostVirtAddr(0x20000), 0x1000, a, FileOffset(0x9000)));
  EXPECT_EQ(registry.size(), 3u);

  auto first = registry.Find(HostVirtAddr(0x10000));
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->file, a);
  EXPECT_EQ(first->offset, FileOffset(0x2000));
  EXPECT_EQ(first->mapping_start, HostVirtAddr(0x10000));
  EXPECT_EQ(first->mapping_size, 0x4000u);

  auto last_byte = registry.Find(HostVirtAddr(0x13fff));
  ASSERT_TRUE(last_byte.has_value());
  EXPECT_EQ(last_byte->file, a);
  EXPECT_EQ(last_byte->offset, FileOffset(0x5fff));

  auto next = registry.Find(HostVirtAddr(0x14000));  // one past a: the start of b
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->file, b);
  EXPECT_EQ(next->offset, FileOffset(0));

  EXPECT_FALSE(registry.Find(HostVirtAddr(0xffff)).has_value());   // just below
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x15000)).has_value());  // just past b
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x1ffff)).has_value());  // in the gap
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x21000)).has_value());  // past the last
  EXPECT_FALSE(registry.Find(HostVirtAddr(0)).has_value());
  EXPECT_FALSE(registry.Find(HostVirtAddr(UINT64_MAX)).has_value());
  auto in_last = registry.Find(HostVirtAddr(0x20800));
  ASSERT_TRUE(in_last.has_value());
  EXPECT_EQ(in_last->offset, FileOffset(0x9800));

  ASSERT_TRUE(registry.Unregister(HostVirtAddr(0x10000)));
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x10000)).has_value());
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x13fff)).has_value());
  EXPECT_TRUE(registry.Find(HostVirtAddr(0x14000)).has_value());
  EXPECT_EQ(registry.size(), 2u);
}

TEST(AddressRegistryTest, RefusesOverlapsAndNonsenseAndChangesNothing) {
  AddressRegistry registry;
  auto file = MakeFile(1);
  ASSERT_TRUE(registry.Register(HostVirtAddr(0x10000), 0x4000, file, FileOffset(0)));
  struct Case {
    uint64_t start;
    uint64_t size;
    std::shared_ptr<MemoryFile> file;
    uint64_t file_offset;
    ErrorCode code;
    const char* message;
  };
  const Case cases[] = {
      {0xf000, 0x2000, file, 0, ErrorCode::kAlreadyExists, "overlaps [0x10000, +0x4000)"},
      {0x13000, 0x1000, file, 0, ErrorCode::kAlreadyExists, "overlaps"},
      {0x11000, 0x1000, file, 0, ErrorCode::kAlreadyExists, "overlaps"},
      {0x8000, 0x100000, file, 0, ErrorCode::kAlreadyExists, "overlaps"},
      {0x30000, 0, file, 0, ErrorCode::kInvalidArgument, "zero size"},
      {0x30000, 0x1000, nullptr, 0, ErrorCode::kInvalidArgument, "no file"},
      {UINT64_MAX - 0xfff, 0x2000, file, 0, ErrorCode::kOutOfRange, "wraps around"},
      {0x30000, 0x2000, file, UINT64_MAX - 0xfff, ErrorCode::kOutOfRange, "overflows"},
  };
  for (const Case& c : cases) {
    auto status =
        registry.Register(HostVirtAddr(c.start), c.size, c.file, FileOffset(c.file_offset));
    ASSERT_FALSE(status) << std::hex << c.start;
    EXPECT_EQ(status.error().code(), c.code);
    EXPECT_THAT(status.error().context(), HasSubstr(c.message));
  }
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_FALSE(registry.Find(HostVirtAddr(0xf000)).has_value());
  EXPECT_FALSE(registry.Find(HostVirtAddr(0x30000)).has_value());
  auto unknown = registry.Unregister(HostVirtAddr(0x11000));  // inside, but not a start
  ASSERT_FALSE(unknown);
  EXPECT_EQ(unknown.error().code(), ErrorCode::kNotFound);
  EXPECT_EQ(registry.size(), 1u);
}

// The process-wide registry through real mappings.
TEST(AddressRegistryTest, MappingsAreFoundWhileTheyLive) {
  auto file = MakeFile(8);
  ASSERT_NE(file, nullptr);
  HostVirtAddr start;
  {
    auto mapping = file->Map(FileOffset(2 * kPageSize4K), 4 * kPageSize4K);
    ASSERT_TRUE(mapping.has_value()) << mapping.error().ToString();
    start = mapping->host_address();
    for (uint64_t delta : {uint64_t{0}, uint64_t{1}, kPageSize4K, 4 * kPageSize4K - 1}) {
      auto found = FindGuestMemory(start.UncheckedAdd(delta));
      ASSERT_TRUE(found.has_value()) << delta;
      EXPECT_EQ(found->file, file);
      EXPECT_EQ(found->offset, FileOffset(2 * kPageSize4K + delta));
      EXPECT_EQ(found->mapping_start, start);
      EXPECT_EQ(found->mapping_size, 4 * kPageSize4K);
    }
    EXPECT_FALSE(FindGuestMemory(start.UncheckedAdd(4 * kPageSize4K)).has_value());
    EXPECT_FALSE(FindGuestMemory(HostVirtAddr(start.value() - 1)).has_value());
    // Ordinary memory is not guest memory.
    int local = 0;
    EXPECT_FALSE(FindGuestMemory(HostVirtAddr(reinterpret_cast<uint64_t>(&local))).has_value());
  }
  EXPECT_FALSE(FindGuestMemory(start).has_value());
  EXPECT_FALSE(FindGuestMemory(start.UncheckedAdd(kPageSize4K)).has_value());
}

TEST(AddressRegistryTest, AFoundLocationKeepsItsFileAlive) {
  std::weak_ptr<MemoryFile> weak;
  std::optional<GuestMemoryLocation> found;
  {
    auto file = MakeFile(2);
    ASSERT_NE(file, nullptr);
    weak = file;
    auto mapping = file->Map();
    ASSERT_TRUE(mapping.has_value());
    found = FindGuestMemory(mapping->host_address());
    ASSERT_TRUE(found.has_value());
  }
  EXPECT_FALSE(weak.expired());
  EXPECT_EQ(found->file->size_bytes(), 2 * kPageSize4K);
  found.reset();
  EXPECT_TRUE(weak.expired());
}

// Lookups from several threads while others map and unmap: every answer is either nothing or a
// mapping that is right about its file and offsets.
TEST(AddressRegistryTest, LookupsRaceWithMapAndUnmap) {
  constexpr uint64_t kFilePages = 16;
  auto file = MakeFile(kFilePages);
  ASSERT_NE(file, nullptr);
  std::atomic<bool> stop{false};
  std::atomic<int> wrong{0};
  std::atomic<uint64_t> hits{0};
  // Addresses the mappers have used; lookers pick among them.
  constexpr int kSlots = 64;
  std::atomic<uint64_t> seen[kSlots] = {};
  std::atomic<int> next_slot{0};

  std::vector<std::thread> mappers;
  for (int t = 0; t < 2; ++t) {
    mappers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::deque<MemoryMapping> live;  // a few stay mapped while later ones come and go
      for (int i = 0; i < 400 || (hits.load() < 100 && i < 200000); ++i) {
        const uint64_t count = 1 + rng() % 4;
        const uint64_t first = rng() % (kFilePages - count + 1);
        auto mapping = file->Map(FileOffset(first * kPageSize4K), count * kPageSize4K);
        if (!mapping) {
          ++wrong;
          continue;
        }
        seen[next_slot++ % kSlots].store(mapping->host_address().value());
        auto found = FindGuestMemory(mapping->host_address().UncheckedAdd(count * kPageSize4K - 1));
        if (!found || found->file != file ||
            found->offset != FileOffset((first + count) * kPageSize4K - 1)) {
          ++wrong;
        }
        live.push_back(std::move(*mapping));
        if (live.size() > 4) live.pop_front();
      }
    });
  }
  std::vector<std::thread> lookers;
  for (int t = 0; t < 2; ++t) {
    lookers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      while (!stop.load()) {
        const uint64_t base = seen[rng() % kSlots].load();
        if (base == 0) continue;
        const HostVirtAddr addr(base + (rng() % (4 * kPageSize4K)));
        auto found = FindGuestMemory(addr);
        if (!found) continue;
        ++hits;
        const uint64_t delta = addr.value() - found->mapping_start.value();
        if (found->file != file || addr < found->mapping_start || delta >= found->mapping_size ||
            found->mapping_size % kPageSize4K != 0 || found->offset.value() < delta ||
            found->offset.value() - delta + found->mapping_size > file->size_bytes()) {
          ++wrong;
        }
      }
    });
  }
  for (auto& th : mappers) th.join();
  stop.store(true);
  for (auto& th : lookers) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(hits.load(), 0u);
  for (const auto& slot : seen) {
    if (slot.load() != 0) {
      EXPECT_FALSE(FindGuestMemory(HostVirtAddr(slot.load())).has_value());
    }
  }
}

}  // namespace
}  // namespace guestmem
