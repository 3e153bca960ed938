#include "guestmem/page_tracker.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <random>
#include <thread>
#include <vector>

namespace guestmem {
namespace {

TEST(PageTrackerTest, PagesStartPendingAndServedIsFinal) {
  PageTracker tracker(200);
  EXPECT_EQ(tracker.page_count(), 200u);
  EXPECT_EQ(tracker.CountServed(0, 200), 0u);
  EXPECT_EQ(tracker.NextServed(0, 200), 200u);
  EXPECT_EQ(tracker.NextPending(0, 200), 0u);
  tracker.MarkServed(60, 70);  // crosses a word boundary on both sides
  tracker.MarkServed(60, 10);  // again: nothing changes
  EXPECT_EQ(tracker.CountServed(0, 200), 70u);
  EXPECT_FALSE(tracker.IsServed(59));
  EXPECT_TRUE(tracker.IsServed(60));
  EXPECT_TRUE(tracker.IsServed(129));
  EXPECT_FALSE(tracker.IsServed(130));
  EXPECT_EQ(tracker.NextServed(0, 200), 60u);
  EXPECT_EQ(tracker.NextPending(60, 200), 130u);
  EXPECT_EQ(tracker.NextPending(60, 100), 100u);  // none in range: the end
  EXPECT_EQ(tracker.NextServed(130, 200), 200u);
  EXPECT_EQ(tracker.CountServed(100, 50), 30u);
  tracker.MarkServed(0, 0);  // an empty range is fine
  EXPECT_EQ(tracker.CountServed(0, 200), 70u);
}

TEST(PageTrackerTest, QueriesAgreeWithAModelOnRandomRanges) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    const uint64_t pages = 1 + rng() % 700;
    PageTracker tracker(pages);
    std::vector<bool> model(pages, false);
    for (int op = 0; op < 50; ++op) {
      const uint64_t first = rng() % pages;
      const uint64_t count = rng() % (pages - first + 1);
      tracker.MarkServed(first, count);
      for (uint64_t p = first; p < first + count; ++p) model[p] = true;
      const uint64_t a = rng() % (pages + 1);
      const uint64_t b = a + rng() % (pages - a + 1);
      uint64_t want_served = b, want_pending = b, want_count = 0;
      for (uint64_t p = b; p-- > a;) {
        if (model[p])
          want_served = p, ++want_count;
        else
          want_pending = p;
      }
      ASSERT_EQ(tracker.NextServed(a, b), want_served) << pages << " " << a << " " << b;
      ASSERT_EQ(tracker.NextPending(a, b), want_pending) << pages << " " << a << " " << b;
      ASSERT_EQ(tracker.CountServed(a, b - a), want_count);
    }
  }
}

TEST(PageTrackerTest, ForkedChildStartsWithTheParentsServedPages) {
  PageTracker parent(100);
  parent.MarkServed(3, 5);
  parent.MarkServed(90, 10);
  PageTracker child(100);
  child.MarkServed(50, 1);
  child.MarkServedFrom(parent);
  EXPECT_EQ(child.CountServed(0, 100), 16u);
  EXPECT_TRUE(child.IsServed(50));
  EXPECT_TRUE(child.IsServed(95));
  EXPECT_EQ(parent.CountServed(0, 100), 15u);  // the parent is unchanged
}

TEST(PageTrackerTest, ConcurrentMarksAreNeverLost) {
  PageTracker tracker(64 * 64);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Every thread marks every 4th page of its own, all in the same words.
      for (uint64_t p = static_cast<uint64_t>(t); p < tracker.page_count(); p += 4) {
        tracker.MarkServed(p, 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(tracker.CountServed(0, tracker.page_count()), tracker.page_count());
}

TEST(PageTrackerTest, ASharedTrackersStateOutlivesItsFirstOwner) {
  auto first = PageTracker::CreateShared(1000);
  ASSERT_TRUE(first.has_value()) << first.error().ToString();
  ASSERT_GE((*first)->shared_fd(), 0);
  (*first)->MarkServed(10, 100);
  (*first)->MarkServed(999, 1);
  UniqueFd handed_over(dup((*first)->shared_fd()));
  first->reset();  // the first owner is gone; the memfd keeps the state
  auto second = PageTracker::AttachShared(std::move(handed_over), 1000);
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  EXPECT_EQ((*second)->CountServed(0, 1000), 101u);
  EXPECT_TRUE((*second)->IsServed(999));
  EXPECT_FALSE((*second)->IsServed(9));
  // Two trackers over one memfd see each other's marks.
  auto third = PageTracker::AttachShared(UniqueFd(dup((*second)->shared_fd())), 1000);
  ASSERT_TRUE(third.has_value());
  (*third)->MarkServed(500, 1);
  EXPECT_TRUE((*second)->IsServed(500));
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
