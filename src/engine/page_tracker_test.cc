#include "guestmem/page_tracker.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <random>
#include <thread>
#include <vector>

namespace guestmem {
namespace {

constexpr PageFate kAllFates[] = {PageFate::kPending, PageFate::kServed, PageFate::kPoisoned,
                                  PageFate::kRemoved};

TEST(PageTrackerTest, PagesStartPendingAndTakeEachFate) {
  PageTracker tracker(200);
  EXPECT_EQ(tracker.page_count(), 200u);
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kPending), 200u);
  EXPECT_EQ(tracker.NextPending(0, 200), 0u);
  tracker.Set(20, 50, PageFate::kServed);  // crosses word boundaries on both sides
  tracker.Set(60, 5, PageFate::kPoisoned);
  tracker.Set(64, 1, PageFate::kRemoved);
  tracker.Set(64, 1, PageFate::kRemoved);  // again: nothing changes
  EXPECT_EQ(tracker.Fate(19), PageFate::kPending);
  EXPECT_EQ(tracker.Fate(20), PageFate::kServed);
  EXPECT_EQ(tracker.Fate(59), PageFate::kServed);
  EXPECT_EQ(tracker.Fate(60), PageFate::kPoisoned);
  EXPECT_EQ(tracker.Fate(64), PageFate::kRemoved);
  EXPECT_EQ(tracker.Fate(65), PageFate::kServed);
  EXPECT_EQ(tracker.Fate(70), PageFate::kPending);
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kServed), 45u);
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kPoisoned), 4u);
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kRemoved), 1u);
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kPending), 150u);
  EXPECT_EQ(tracker.NextPending(20, 200), 70u);
  EXPECT_EQ(tracker.NextPending(20, 60), 60u);  // none in range: the end
  tracker.Set(0, 0, PageFate::kServed);         // an empty range is fine
  EXPECT_EQ(tracker.CountIn(0, 200, PageFate::kServed), 45u);
  EXPECT_EQ(PageFateName(PageFate::kPoisoned), "poisoned");
}

TEST(PageTrackerTest, QueriesAgreeWithAModelOnRandomRanges) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    const uint64_t pages = 1 + rng() % 700;
    PageTracker tracker(pages);
    std::vector<PageFate> model(pages, PageFate::kPending);
    for (int op = 0; op < 50; ++op) {
      const uint64_t first = rng() % pages;
      const uint64_t count = rng() % (pages - first + 1);
      const PageFate fate = kAllFates[rng() % 4];
      tracker.Set(first, count, fate);
      for (uint64_t p = first; p < first + count; ++p) model[p] = fate;
      const uint64_t a = rng() % (pages + 1);
      const uint64_t b = a + rng() % (pages - a + 1);
      uint64_t want_pending = b;
      for (uint64_t p = b; p-- > a;) {
        if (model[p] == PageFate::kPending) want_pending = p;
      }
      ASSERT_EQ(tracker.NextPending(a, b), want_pending) << pages << " " << a << " " << b;
      for (PageFate f : kAllFates) {
        const uint64_t want =
            static_cast<uint64_t>(std::count(model.begin() + static_cast<std::ptrdiff_t>(a),
                                             model.begin() + static_cast<std::ptrdiff_t>(b), f));
        ASSERT_EQ(tracker.CountIn(a, b - a, f), want) << PageFateName(f);
      }
      const uint64_t p = rng() % pages;
      ASSERT_EQ(tracker.Fate(p), model[p]);
    }
  }
}

TEST(PageTrackerTest, ForkedChildStartsWithTheParentsFates) {
  PageTracker parent(100);
  parent.Set(3, 5, PageFate::kServed);
  parent.Set(90, 10, PageFate::kPoisoned);
  PageTracker child(100);
  child.Set(50, 1, PageFate::kRemoved);
  child.CopyFrom(parent);
  EXPECT_EQ(child.CountIn(0, 100, PageFate::kServed), 5u);
  EXPECT_EQ(child.CountIn(0, 100, PageFate::kPoisoned), 10u);
  EXPECT_EQ(child.Fate(50), PageFate::kPending);               // a copy, not a merge
  EXPECT_EQ(parent.CountIn(0, 100, PageFate::kPending), 85u);  // the parent is unchanged
}

TEST(PageTrackerTest, ConcurrentChangesToOneWordAreNeverLost) {
  PageTracker tracker(64 * 32);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Every thread sets every 4th page of its own, all in the same words.
      for (uint64_t p = static_cast<uint64_t>(t); p < tracker.page_count(); p += 4) {
        tracker.Set(p, 1, kAllFates[1 + t % 3]);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (uint64_t p = 0; p < tracker.page_count(); ++p) {
    ASSERT_EQ(tracker.Fate(p), kAllFates[1 + (p % 4) % 3]) << p;
  }
}

TEST(PageTrackerTest, ASharedTrackersStateOutlivesItsFirstOwner) {
  auto first = PageTracker::CreateShared(1000);
  ASSERT_TRUE(first.has_value()) << first.error().ToString();
  ASSERT_GE((*first)->shared_fd(), 0);
  (*first)->Set(10, 100, PageFate::kServed);
  (*first)->Set(999, 1, PageFate::kRemoved);
  UniqueFd handed_over(dup((*first)->shared_fd()));
  first->reset();  // the first owner is gone; the memfd keeps the state
  auto second = PageTracker::AttachShared(std::move(handed_over), 1000);
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  EXPECT_EQ((*second)->CountIn(0, 1000, PageFate::kServed), 100u);
  EXPECT_EQ((*second)->Fate(999), PageFate::kRemoved);
  EXPECT_EQ((*second)->Fate(9), PageFate::kPending);
  // Two trackers over one memfd see each other's changes.
  auto third = PageTracker::AttachShared(UniqueFd(dup((*second)->shared_fd())), 1000);
  ASSERT_TRUE(third.has_value());
  (*third)->Set(500, 1, PageFate::kPoisoned);
  EXPECT_EQ((*second)->Fate(500), PageFate::kPoisoned);
}

TEST(PageTrackerTest, AMemfdOfTheWrongSizeIsRefused) {
  auto shared = PageTracker::CreateShared(1000);
  ASSERT_TRUE(shared.has_value());
  auto wrong = PageTracker::AttachShared(UniqueFd(dup((*shared)->shared_fd())), 100000);
  ASSERT_FALSE(wrong.has_value());
  EXPECT_EQ(wrong.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(PageTracker(10).shared_fd(), -1);
}

}  // namespace
}  // namespace guestmem
