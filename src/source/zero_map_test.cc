#include "guestmem/zero_map.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/snapshot_cache.h"
#include "testutil/error_code.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = kPageSize4K;

// A file of `kinds.size()` pages: 'd' data, 'z' zeros written, 'h' a hole.
std::string MakeFile(const TempDir& dir, const std::string& name, const std::string& kinds) {
  const std::string path = dir.File(name);
  const int fd = open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0600);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(ftruncate(fd, static_cast<off_t>(kinds.size() * kPage)), 0);
  std::vector<uint8_t> page(kPage);
  for (size_t p = 0; p < kinds.size(); ++p) {
    if (kinds[p] == 'h') continue;
    std::fill(page.begin(), page.end(), 0);
    if (kinds[p] == 'd') page[(p * 37) % kPage] = static_cast<uint8_t>(p + 1);
    EXPECT_EQ(pwrite(fd, page.data(), kPage, static_cast<off_t>(p * kPage)),
              static_cast<ssize_t>(kPage));
  }
  close(fd);
  return path;
}

std::shared_ptr<RawFileSource> Open(const std::string& path) {
  auto source = RawFileSource::Open(path);
  EXPECT_TRUE(source.has_value()) << source.error().ToString();
  return std::shared_ptr<RawFileSource>(std::move(*source));
}

TEST(ZeroMapTest, FindsZeroPagesByContentAndHoles) {
  TempDir dir;
  const std::string kinds = "dzzhhdddzhdzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzdh";
  auto source = Open(MakeFile(dir, "snap", kinds));
  auto map = ZeroMap::Scan(*source);
  ASSERT_TRUE(map.has_value()) << map.error().ToString();
  ASSERT_EQ((*map)->page_count(), kinds.size());
  uint64_t zeros = 0;
  for (size_t p = 0; p < kinds.size(); ++p) {
    EXPECT_EQ((*map)->IsZero(p), kinds[p] != 'd') << p;
    zeros += kinds[p] != 'd' ? 1 : 0;
  }
  EXPECT_EQ((*map)->zero_pages(), zeros);
  EXPECT_EQ((*map)->RunEnd(0, kinds.size()), 1u);
  EXPECT_EQ((*map)->RunEnd(1, kinds.size()), 5u);                 // zeros written and holes alike
  EXPECT_EQ((*map)->RunEnd(11, kinds.size()), kinds.size() - 2);  // across 64-page words
  EXPECT_EQ((*map)->RunEnd(11, 20), 20u);
  // The source reports them as zero extents from now on.
  ASSERT_EQ(source->ExtentAt(FileOffset(kPage))->kind,
            ExtentKind::kData);  // holes only: 'z' is data
  source->SetZeroMap(*map);
  auto extent = source->ExtentAt(FileOffset(kPage));
  ASSERT_TRUE(extent.has_value());
  EXPECT_EQ(extent->kind, ExtentKind::kZero);
  EXPECT_EQ(extent->length, 4 * kPage);
  extent = source->ExtentAt(FileOffset(5 * kPage + 100));
  EXPECT_EQ(extent->kind, ExtentKind::kData);
  EXPECT_EQ(extent->length, 3 * kPage - 100);
  EXPECT_NE(source->Describe().find("% zero pages"), std::string::npos) << source->Describe();
}

TEST(ZeroMapTest, TheKeptFormRoundTripsAndRefusesWhatIsTornStaleOrCorrupt) {
  TempDir dir;
  auto source = Open(MakeFile(dir, "snap", std::string(100, 'z') + "ddhz"));
  auto map = ZeroMap::Scan(*source);
  ASSERT_TRUE(map.has_value());
  auto identity = IdentifySnapshot(*source);
  ASSERT_TRUE(identity.has_value());
  const std::string bytes = (*map)->Serialize(*identity);
  auto span = std::as_bytes(std::span(bytes));
  auto parsed = ZeroMap::Parse(span, *identity);
  ASSERT_TRUE(parsed.has_value()) << parsed.error().ToString();
  for (uint64_t p = 0; p < 104; ++p) EXPECT_EQ((*parsed)->IsZero(p), (*map)->IsZero(p)) << p;
  // A torn file, a flipped bit, an entry for another version of the file.
  EXPECT_EQ(testutil::ErrorCodeOf(ZeroMap::Parse(span.first(span.size() - 9), *identity)),
            ErrorCode::kDataLoss);
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x10;
  EXPECT_EQ(testutil::ErrorCodeOf(ZeroMap::Parse(std::as_bytes(std::span(flipped)), *identity)),
            ErrorCode::kDataLoss);
  SnapshotIdentity other = *identity;
  other.content_sample ^= 1;
  EXPECT_EQ(testutil::ErrorCodeOf(ZeroMap::Parse(span, other)), ErrorCode::kFailedPrecondition);
  const std::string junk = "junk";
  EXPECT_EQ(testutil::ErrorCodeOf(ZeroMap::Parse(std::as_bytes(std::span(junk)), *identity)),
            ErrorCode::kDataLoss);
}

TEST(SnapshotCacheTest, ScansOnceKeepsTheMapAndRebuildsAStaleOrCorruptOne) {
  TempDir dir;
  const std::string path = MakeFile(dir, "snap", "dzzzzddz");
  auto cache = SnapshotCache::Open(dir.File("cache/nested"));
  ASSERT_TRUE(cache.has_value()) << cache.error().ToString();
  auto source = Open(path);
  auto first = cache->ZeroMapFor(*source);
  ASSERT_TRUE(first.has_value()) << first.error().ToString();
  EXPECT_EQ((*first)->zero_pages(), 5u);
  const std::string entry = cache->ZeroMapPath(source->identity());
  ASSERT_TRUE(std::filesystem::exists(entry));
  const auto written = std::filesystem::last_write_time(entry);
  auto second = cache->ZeroMapFor(*source);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ((*second)->zero_pages(), 5u);
  EXPECT_EQ(std::filesystem::last_write_time(entry), written);  // read, not written again

  // A corrupt entry is not trusted: the file is scanned again and the entry replaced.
  {
    std::fstream f(entry, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x7f');
  }
  auto rebuilt = cache->ZeroMapFor(*source);
  ASSERT_TRUE(rebuilt.has_value());
  EXPECT_EQ((*rebuilt)->zero_pages(), 5u);
  // The snapshot changes (a zero page gets data): the entry is stale and never used.
  {
    const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    const char byte = 1;
    ASSERT_EQ(pwrite(fd, &byte, 1, static_cast<off_t>(2 * kPage + 5)), 1);
    close(fd);
  }
  auto changed_source = Open(path);
  auto fresh = cache->ZeroMapFor(*changed_source);
  ASSERT_TRUE(fresh.has_value());
  EXPECT_EQ((*fresh)->zero_pages(), 4u);
  EXPECT_FALSE((*fresh)->IsZero(2));
}

TEST(SnapshotCacheTest, TheDefaultDirectoryFollowsTheUser) {
  const std::string dir = SnapshotCache::DefaultDirectory();
  if (geteuid() == 0) {
    EXPECT_EQ(dir, "/var/cache/guestmem");
  } else {
    EXPECT_NE(dir.find("guestmem"), std::string::npos);
  }
}

TEST(RawFileSourceViewTest, AViewIsTheFilesContentInPlace) {
  TempDir dir;
  auto source = Open(MakeFile(dir, "snap", "dddd"));
  auto view = source->View(FileOffset(kPage), 2 * kPage);
  ASSERT_EQ(view.size(), 2 * kPage);
  std::vector<std::byte> read(2 * kPage);
  ASSERT_TRUE(source->ReadAt(FileOffset(kPage), read));
  EXPECT_EQ(std::memcmp(view.data(), read.data(), read.size()), 0);
  EXPECT_TRUE(source->View(FileOffset(3 * kPage), 2 * kPage).empty());  // past the end
}

}  // namespace
}  // namespace guestmem
