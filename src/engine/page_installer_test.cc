#include "guestmem/page_installer.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "base/fault_injection_os.h"
#include "testutil/huge_pages.h"

namespace guestmem {
namespace {

using Outcome = InstallProgress::Outcome;
constexpr uint64_t kPage = kPageSize4K;

// Anonymous memory registered MISSING with a uffd, described as one region.
struct Target {
  explicit Target(uint64_t size, uint64_t page_size = kPage, Os* os = nullptr) {
    auto map = Mapping::Anonymous(size, MAP_NORESERVE | (page_size == kPage ? 0 : MAP_HUGETLB));
    EXPECT_TRUE(map.has_value()) << map.error().ToString();
    memory = std::move(*map);
    auto created = Userfaultfd::Create({.os = os});
    EXPECT_TRUE(created.has_value()) << created.error().ToString();
    uffd.emplace(std::move(*created));
    EXPECT_TRUE(uffd->Register(HostVirtAddr(memory.address()), size, UffdModes::kMissing));
    region = GuestRegion{GuestPhysAddr(0), size, FileOffset(0), HostVirtAddr(memory.address()),
                         page_size};
  }
  const uint8_t* at(uint64_t offset) const {
    return reinterpret_cast<const uint8_t*>(memory.bytes()) + offset;
  }
  Mapping memory;
  std::optional<Userfaultfd> uffd;
  GuestRegion region;
};

std::vector<std::byte> Pattern(uint64_t length, uint8_t seed) {
  std::vector<std::byte> bytes(length);
  for (uint64_t i = 0; i < length; ++i) bytes[i] = std::byte(static_cast<uint8_t>(seed + i / 4096));
  return bytes;
}

bool Filled(const uint8_t* data, uint64_t length, uint8_t value) {
  for (uint64_t i = 0; i < length; ++i) {
    if (data[i] != value) return false;
  }
  return true;
}

TEST(CopyInstallerTest, CopiesDataAndMapsZeros) {
  Target t(16 * kPage);
  auto zeros = MapZeros(0);
  ASSERT_TRUE(zeros.has_value());
  CopyInstaller installer(&*t.uffd, &*zeros);
  const auto data = Pattern(8 * kPage, 10);
  auto done = installer.Install(t.region, 0, 8 * kPage, {ContentKind::kData, data});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_EQ(done->bytes, 8 * kPage);
  EXPECT_EQ(std::memcmp(t.at(0), data.data(), data.size()), 0);
  done = installer.Install(t.region, 8 * kPage, 8 * kPage, {ContentKind::kZero, {}});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_TRUE(Filled(t.at(8 * kPage), 8 * kPage, 0));
  EXPECT_EQ(installer.counters().copied.load(), 8u);
  EXPECT_EQ(installer.counters().zeroed.load(), 8u);
}

TEST(CopyInstallerTest, APageAlreadyMappedIsKeptAndTheRestInstalled) {
  Target t(8 * kPage);
  auto zeros = MapZeros(0);
  ASSERT_TRUE(zeros.has_value());
  CopyInstaller installer(&*t.uffd, &*zeros);
  const auto first = Pattern(kPage, 99);
  ASSERT_TRUE(installer.Install(t.region, 3 * kPage, kPage, {ContentKind::kData, first}));
  const auto data = Pattern(8 * kPage, 1);
  auto done = installer.Install(t.region, 0, 8 * kPage, {ContentKind::kData, data});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_TRUE(Filled(t.at(3 * kPage), kPage, 99));  // kept, not overwritten
  EXPECT_EQ(std::memcmp(t.at(0), data.data(), 3 * kPage), 0);
  EXPECT_EQ(std::memcmp(t.at(4 * kPage), data.data() + 4 * kPage, 4 * kPage), 0);
  EXPECT_EQ(installer.counters().copied.load(), 1u + 7u);
}

TEST(CopyInstallerTest, OutcomesOfTheKernelAreReportedWithTheirProgress) {
  FaultInjectionOs os;
  Target t(4 * kPage, kPage, &os);
  auto zeros = MapZeros(0);
  ASSERT_TRUE(zeros.has_value());
  CopyInstaller installer(&*t.uffd, &*zeros);
  os.FailNext(FaultInjectionOs::Call::kIoctl, EAGAIN);
  auto again = installer.Install(t.region, 0, 4 * kPage, {ContentKind::kZero, {}});
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->outcome, Outcome::kAgain);
  EXPECT_EQ(again->bytes, 0u);
  os.FailNext(FaultInjectionOs::Call::kIoctl, ESRCH);
  auto gone = installer.Install(t.region, 0, 4 * kPage, {ContentKind::kZero, {}});
  ASSERT_TRUE(gone.has_value());
  EXPECT_EQ(gone->outcome, Outcome::kTaskGone);
  os.FailNext(FaultInjectionOs::Call::kIoctl, ENOMEM);
  EXPECT_FALSE(installer.Install(t.region, 0, 4 * kPage, {ContentKind::kZero, {}}).has_value());
  // Unmapped memory: no mapping any more; nothing installed, no error.
  ASSERT_EQ(munmap(t.memory.data(), 4 * kPage), 0);
  t.memory.release();
  auto unmapped = installer.Install(t.region, 0, 4 * kPage, {ContentKind::kZero, {}});
  ASSERT_TRUE(unmapped.has_value()) << unmapped.error().ToString();
  EXPECT_EQ(unmapped->outcome, Outcome::kNoMapping);
  EXPECT_EQ(installer.counters().zeroed.load(), 0u);
  // Content already in a file is not for anonymous memory.
  EXPECT_FALSE(installer.Install(t.region, 0, kPage, {ContentKind::kInFile, {}}).has_value());
}

TEST(CopyInstallerTest, ZeroRunsLongerThanTheZeroSourceAreCopiedInSteps) {
  testutil::HugePageReservation reservation(3);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  Target t(3 * kHugePageSize2M, kHugePageSize2M);
  auto zeros = MapZeros(kHugePageSize2M);  // one huge page of zeros for three
  ASSERT_TRUE(zeros.has_value());
  ASSERT_EQ(zeros->size(), kHugePageSize2M);
  CopyInstaller installer(&*t.uffd, &*zeros);
  auto done = installer.Install(t.region, 0, 3 * kHugePageSize2M, {ContentKind::kZero, {}});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_TRUE(Filled(t.at(0), 3 * kHugePageSize2M, 0));
  EXPECT_EQ(installer.counters().zeroed.load(), 3 * kHugePageSize2M / kPage);
}

// A shmem guest memory file mapped shared and registered MISSING|MINOR (the full minor trap).
struct FileTarget {
  explicit FileTarget(uint64_t size, MemoryBackend backend = MemoryBackend::kShmem) {
    auto created = MemoryFile::Create({.size_bytes = size, .backend = backend});
    if (!created) {
      why = created.error().ToString();
      return;
    }
    file = *created;
    auto mapped = file->Map();
    EXPECT_TRUE(mapped.has_value()) << mapped.error().ToString();
    mapping.emplace(std::move(*mapped));
    const uint64_t features = backend == MemoryBackend::kShmem
                                  ? kUffdFeatureMinorShmem | kUffdFeatureMissingShmem
                                  : kUffdFeatureMinorHugetlbfs | kUffdFeatureMissingHugetlbfs;
    auto u = Userfaultfd::Create({.required_features = features});
    if (!u) {
      why = u.error().ToString();
      return;
    }
    uffd.emplace(std::move(*u));
    EXPECT_TRUE(
        uffd->Register(mapping->host_address(), size, UffdModes::kMissing | UffdModes::kMinor));
    region = GuestRegion{GuestPhysAddr(0), size, FileOffset(0), mapping->host_address(),
                         file->page_size()};
  }
  const uint8_t* at(uint64_t offset) const {
    return reinterpret_cast<const uint8_t*>(mapping->data()) + offset;
  }
  std::string why;  // non-empty: this machine cannot do it
  std::shared_ptr<MemoryFile> file;
  std::optional<MemoryMapping> mapping;
  std::optional<Userfaultfd> uffd;
  GuestRegion region;
};

TEST(MinorTrapInstallerTest, WritesTheFileThenMapsAndOnlyMapsWhatTheFileHolds) {
  FileTarget t(16 * kPage);
  if (!t.why.empty()) GTEST_SKIP() << t.why;
  auto zeros = MapZeros(0);
  ASSERT_TRUE(zeros.has_value());
  MinorTrapInstaller installer(&*t.uffd, t.file.get(), &*zeros);
  // Pages 4-5 are in the file already, with content of their own: they must be kept.
  const auto own = Pattern(2 * kPage, 200);
  ASSERT_TRUE(t.file->Populate(FileOffset(4 * kPage), own));
  const auto data = Pattern(8 * kPage, 1);
  auto done = installer.Install(t.region, 0, 8 * kPage, {ContentKind::kData, data});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_EQ(std::memcmp(t.at(0), data.data(), 4 * kPage), 0);
  EXPECT_EQ(std::memcmp(t.at(4 * kPage), own.data(), 2 * kPage), 0);
  EXPECT_EQ(std::memcmp(t.at(6 * kPage), data.data() + 6 * kPage, 2 * kPage), 0);
  // Zeros: straight into the page cache and the mapping; the file knows they are there.
  done = installer.Install(t.region, 8 * kPage, 8 * kPage, {ContentKind::kZero, {}});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_TRUE(Filled(t.at(8 * kPage), 8 * kPage, 0));
  EXPECT_EQ(t.file->pages().CountPrepared(0, 16), 16u);
  EXPECT_EQ(installer.counters().continued.load(), 8u);
  EXPECT_EQ(installer.counters().zeroed.load(), 8u);
}

TEST(MinorTrapInstallerTest, HugetlbZeroRunsLongerThanTheZeroSourceAreWrittenWhole) {
  testutil::HugePageReservation reservation(3);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  FileTarget t(3 * kHugePageSize2M, MemoryBackend::kHugetlb);
  if (!t.why.empty()) GTEST_SKIP() << t.why;
  auto zeros = MapZeros(kHugePageSize2M);
  ASSERT_TRUE(zeros.has_value());
  // Whatever follows the zero source in memory must never end up in the guest: put content
  // right after it.
  MinorTrapInstaller installer(&*t.uffd, t.file.get(), &*zeros);
  auto done = installer.Install(t.region, 0, 3 * kHugePageSize2M, {ContentKind::kZero, {}});
  ASSERT_TRUE(done.has_value()) << done.error().ToString();
  EXPECT_EQ(done->outcome, Outcome::kDone);
  EXPECT_TRUE(Filled(t.at(0), 3 * kHugePageSize2M, 0));
  EXPECT_EQ(t.file->pages().CountPrepared(0, 3), 3u);
  EXPECT_EQ(installer.counters().zeroed.load(), 3 * kHugePageSize2M / kPage);
}

}  // namespace
}  // namespace guestmem
