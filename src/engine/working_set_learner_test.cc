#include "guestmem/working_set_learner.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <vector>

#include "base/temp_dir.h"

namespace guestmem {
namespace {

constexpr uint64_t kPages = 64;

std::string MakeSnapshot(const TempDir& dir, uint8_t fill) {
  const std::string path = dir.File("snap");
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const std::vector<char> page(kPageSize4K, static_cast<char>(fill));
  for (uint64_t p = 0; p < kPages; ++p) out.write(page.data(), static_cast<std::streamsize>(page.size()));
  return path;
}

std::unique_ptr<RawFileSource> Open(const std::string& path) {
  auto source = RawFileSource::Open(path);
  EXPECT_TRUE(source.has_value()) << source.error().ToString();
  return std::move(*source);
}

TEST(WorkingSetLearnerTest, WhatOneDaemonLearnedTheNextOneFindsInTheCache) {
  TempDir dir;
  auto cache = SnapshotCache::Open(dir.File("cache"));
  ASSERT_TRUE(cache.has_value()) << cache.error().ToString();
  auto snapshot = Open(MakeSnapshot(dir, 7));
  {
    WorkingSetLearner learner(&*cache);
    EXPECT_EQ(learner.LearnedFor(*snapshot), nullptr);
    auto learned = learner.Learn(*snapshot, std::vector<uint64_t>{9, 3, 40}, 0);
    ASSERT_NE(learned, nullptr);
    EXPECT_EQ(learned->Pages(), (std::vector<uint64_t>{9, 3, 40}));
    // A second restore that prefetched the three and needed one more page.
    learned = learner.Learn(*snapshot, std::vector<uint64_t>{5}, 3);
    EXPECT_EQ(learned->size(), 4u);
    EXPECT_EQ(learner.LearnedFor(*snapshot)->restores(), 2u);
  }
  WorkingSetLearner next(&*cache);
  auto found = next.LearnedFor(*snapshot);
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->restores(), 2u);
  EXPECT_EQ(found->size(), 4u);
  // 5 was needed first in its restore, as 9 was in the first: they rank alike.
  EXPECT_EQ(found->Pages(), (std::vector<uint64_t>{5, 9, 3, 40}));
}

TEST(WorkingSetLearnerTest, ARewrittenSnapshotOrACorruptEntryIsLearnedAnew) {
  TempDir dir;
  auto cache = SnapshotCache::Open(dir.File("cache"));
  ASSERT_TRUE(cache.has_value()) << cache.error().ToString();
  const std::string path = MakeSnapshot(dir, 7);
  auto snapshot = Open(path);
  WorkingSetLearner(&*cache).Learn(*snapshot, std::vector<uint64_t>{1, 2}, 0);
  ASSERT_NE(WorkingSetLearner(&*cache).LearnedFor(*snapshot), nullptr);

  // Corrupt: one byte of the entry flipped.
  const std::string entry = cache->WorkingSetPath(snapshot->identity());
  {
    std::fstream f(entry, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(20);
    f.put('\xff');
  }
  EXPECT_EQ(WorkingSetLearner(&*cache).LearnedFor(*snapshot), nullptr);
  EXPECT_NE(access(entry.c_str(), F_OK), 0) << "a corrupt entry is removed";

  // Rewritten in place (same inode, other content and time stamps): nothing learned applies.
  WorkingSetLearner(&*cache).Learn(*snapshot, std::vector<uint64_t>{1, 2}, 0);
  {
    const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const std::vector<char> page(kPageSize4K, 'x');
    ASSERT_EQ(pwrite(fd, page.data(), page.size(), 0), static_cast<ssize_t>(page.size()));
    struct timespec later[2] = {{0, UTIME_OMIT}, {1'900'000'000, 0}};
    ASSERT_EQ(futimens(fd, later), 0);
    close(fd);
  }
  auto rewritten = Open(path);
  EXPECT_EQ(WorkingSetLearner(&*cache).LearnedFor(*rewritten), nullptr);

  // Forgotten: nothing.
  WorkingSetLearner(&*cache).Learn(*rewritten, std::vector<uint64_t>{4}, 0);
  ASSERT_TRUE(cache->ForgetWorkingSet(rewritten->identity()).has_value());
  EXPECT_EQ(WorkingSetLearner(&*cache).LearnedFor(*rewritten), nullptr);
}

TEST(WorkingSetLearnerTest, WithoutACacheItLearnsForAsLongAsItLives) {
  TempDir dir;
  auto snapshot = Open(MakeSnapshot(dir, 1));
  WorkingSetLearner learner(nullptr);
  learner.Learn(*snapshot, std::vector<uint64_t>{6}, 0);
  ASSERT_NE(learner.LearnedFor(*snapshot), nullptr);
  EXPECT_EQ(learner.LearnedFor(*snapshot)->Pages(), std::vector<uint64_t>{6});
  EXPECT_EQ(WorkingSetLearner(nullptr).LearnedFor(*snapshot), nullptr);
}

}  // namespace
}  // namespace guestmem
