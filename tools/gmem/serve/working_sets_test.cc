#include "serve/working_sets.h"

#include <gtest/gtest.h>

#include <vector>

namespace guestmem::cli {
namespace {

FileIdentity Snapshot(uint64_t ino) { return FileIdentity{.dev = 1, .ino = ino, .size = 1 << 20}; }

TEST(WorkingSetsTest, LearnsTheServedPagesAsRuns) {
  PageTracker tracker(64);
  tracker.Set(3, 5, PageFate::kServed);
  tracker.Set(8, 2, PageFate::kServed);  // adjacent: one run 3..10
  tracker.Set(20, 1, PageFate::kRemoved);
  tracker.Set(30, 1, PageFate::kPoisoned);
  tracker.Set(40, 4, PageFate::kServed);
  WorkingSets sets;
  sets.Learn(Snapshot(7), tracker);
  auto set = sets.Find(Snapshot(7));
  ASSERT_NE(set, nullptr);
  EXPECT_EQ(set->runs, (std::vector<PageRun>{{3, 10}, {40, 44}}));
  EXPECT_EQ(set->pages, 11u);
  EXPECT_EQ(sets.Find(Snapshot(8)), nullptr);
  // The next VM of the snapshot replaces it; one that served nothing forgets it.
  PageTracker next(64);
  next.Set(0, 1, PageFate::kServed);
  sets.Learn(Snapshot(7), next);
  EXPECT_EQ(sets.Find(Snapshot(7))->runs, (std::vector<PageRun>{{0, 1}}));
  sets.Learn(Snapshot(7), PageTracker(64));
  EXPECT_EQ(sets.Find(Snapshot(7)), nullptr);
}

TEST(WorkingSetsTest, KeepsTheLatestSnapshotsOnly) {
  PageTracker tracker(8);
  tracker.Set(0, 1, PageFate::kServed);
  WorkingSets sets;
  for (uint64_t i = 0; i < WorkingSets::kSnapshots + 3; ++i) sets.Learn(Snapshot(i), tracker);
  EXPECT_EQ(sets.size(), WorkingSets::kSnapshots);
  EXPECT_EQ(sets.Find(Snapshot(0)), nullptr);
  EXPECT_EQ(sets.Find(Snapshot(2)), nullptr);
  EXPECT_NE(sets.Find(Snapshot(3)), nullptr);
  EXPECT_NE(sets.Find(Snapshot(WorkingSets::kSnapshots + 2)), nullptr);
}

// One fault per fault-around window holding a pending page of the set, at its first such page,
// with the gpa of the region that holds it; served pages and pages in no region are skipped.
TEST(WorkingSetsTest, PrefetchFaultsAreOneAWindowInTheirRegion) {
  // Two regions of 32 pages: file pages 0..31 at gpa 0, 32..63 at gpa 4 GiB.
  const uint64_t gib4 = uint64_t{1} << 32;
  const std::vector<HandshakeRegion> regions = {
      {0x7f0000000000, 32 * kPageSize4K, 0, 4096, 4096, 0, true},
      {0x7f1000000000, 32 * kPageSize4K, 32 * kPageSize4K, 4096, 4096, gib4, true}};
  PageTracker tracker(64);
  tracker.Set(16, 16, PageFate::kServed);  // already in: pages 16..31
  WorkingSet set{.runs = {{2, 20}, {30, 40}, {60, 70}}, .pages = 0};
  const std::vector<GuestFault> faults =
      PrefetchFaults(set, regions, 8 * kPageSize4K, tracker);  // windows of 8 pages
  std::vector<uint64_t> gpas;
  for (const GuestFault& f : faults) {
    EXPECT_TRUE(f.prefetch);
    gpas.push_back(f.gpa.value());
  }
  EXPECT_EQ(gpas, (std::vector<uint64_t>{2 * kPageSize4K,             // window 0..7
                                         8 * kPageSize4K,             // window 8..15
                                         gib4,                        // page 32: window 32..39
                                         gib4 + 28 * kPageSize4K}));  // page 60: window 56..63
}

}  // namespace
}  // namespace guestmem::cli
