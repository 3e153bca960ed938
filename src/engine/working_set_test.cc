#include "guestmem/working_set.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "testutil/error_code.h"

namespace guestmem {
namespace {

SnapshotIdentity Identity() {
  return SnapshotIdentity{.file = {.dev = 1, .ino = 2, .size = 1000 * kPageSize4K},
                          .content_sample = 7};
}

TEST(WorkingSetRecorderTest, KeepsEachPageOnceWhereItWasFirstNeeded) {
  WorkingSetRecorder recorder;
  recorder.Append(10, 3);
  recorder.Append(5, 1);
  recorder.Append(11, 4);  // 11, 12 again
  EXPECT_EQ(recorder.Take(), (std::vector<uint64_t>{10, 11, 12, 5, 13, 14}));
  EXPECT_TRUE(recorder.Take().empty());
  // A VM that balloons and faults the same pages back again and again: recorded once.
  for (int storm = 0; storm < 1000; ++storm) recorder.Append(0, 512);
  EXPECT_EQ(recorder.Take().size(), 512u);
}

TEST(WorkingSetTest, WhatFaultsNeededIsInRankedByFirstNeed) {
  const std::vector<uint64_t> first = {30, 10, 20};
  WorkingSet learned = WorkingSet::Merge(WorkingSet(), first);
  EXPECT_EQ(learned.Pages(), first);
  EXPECT_EQ(learned.restores(), 1u);
  // The next restore needed 10 first and 40 anew; 30 and 20 were installed ahead of time and
  // never faulted: they stay, fading, where they were. 10's rank is the mean of its two.
  const std::vector<uint64_t> second = {10, 40};
  learned = WorkingSet::Merge(learned, second);
  EXPECT_EQ(learned.restores(), 2u);
  EXPECT_EQ(learned.Pages(), (std::vector<uint64_t>{30, 10, 40, 20}));
  for (const WorkingSet::Entry& e : learned.entries()) {
    EXPECT_FLOAT_EQ(e.score, e.page == 10 || e.page == 40 ? 1.0f : 0.9f) << e.page;
  }
}

TEST(WorkingSetTest, APageNoFaultNeedsAgainLeavesAfterSomeRestores) {
  WorkingSet learned = WorkingSet::Merge(WorkingSet(), std::vector<uint64_t>{1, 2});
  int restores = 0;
  while (learned.size() == 2 && restores < 20) {
    learned = WorkingSet::Merge(learned, std::vector<uint64_t>{1});
    ++restores;
  }
  EXPECT_EQ(learned.Pages(), std::vector<uint64_t>{1});
  EXPECT_EQ(restores, 7);  // 0.9^7 < 0.5 <= 0.9^6
}

TEST(WorkingSetTest, APagePrefetchedKeepsItsScoreOnlyThoseNotReachedFade) {
  WorkingSet learned = WorkingSet::Merge(WorkingSet(), std::vector<uint64_t>{5, 6, 7});
  // The next restore prefetched 5 and 6, then ended; it needed nothing.
  for (int restore = 0; restore < 20; ++restore) {
    learned = WorkingSet::Merge(learned, std::vector<uint64_t>{}, /*prefetched=*/2);
  }
  EXPECT_EQ(learned.Pages(), (std::vector<uint64_t>{5, 6}));
  for (const WorkingSet::Entry& e : learned.entries()) EXPECT_FLOAT_EQ(e.score, 1.0f) << e.page;
}

TEST(WorkingSetTest, TheKeptFormRoundTripsAndRefusesWhatIsTornStaleOrCorrupt) {
  WorkingSet learned = WorkingSet::Merge(WorkingSet(), std::vector<uint64_t>{7, 3, 999, 0});
  learned = WorkingSet::Merge(learned, std::vector<uint64_t>{3, 4});
  const std::string bytes = learned.Serialize(Identity());
  auto parsed = WorkingSet::Parse(std::as_bytes(std::span(bytes)), Identity());
  ASSERT_TRUE(parsed.has_value()) << parsed.error().ToString();
  EXPECT_EQ(parsed->Pages(), learned.Pages());
  EXPECT_EQ(parsed->restores(), 2u);
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 1;
  EXPECT_EQ(testutil::ErrorCodeOf(WorkingSet::Parse(std::as_bytes(std::span(flipped)), Identity())),
            ErrorCode::kDataLoss);
  EXPECT_EQ(testutil::ErrorCodeOf(WorkingSet::Parse(
                std::as_bytes(std::span(bytes)).first(bytes.size() - 3), Identity())),
            ErrorCode::kDataLoss);
  SnapshotIdentity other = Identity();
  other.file.mtime_ns = 1;
  EXPECT_EQ(testutil::ErrorCodeOf(WorkingSet::Parse(std::as_bytes(std::span(bytes)), other)),
            ErrorCode::kFailedPrecondition);
  // A page past the end of the snapshot is corruption, whatever the checksum says.
  SnapshotIdentity smaller = Identity();
  smaller.file.size = 500 * kPageSize4K;
  const std::string for_smaller = learned.Serialize(smaller);
  EXPECT_EQ(
      testutil::ErrorCodeOf(WorkingSet::Parse(std::as_bytes(std::span(for_smaller)), smaller)),
      ErrorCode::kDataLoss);
}

}  // namespace
}  // namespace guestmem
