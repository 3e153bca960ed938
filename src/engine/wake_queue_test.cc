// The worker's wake-up deadlines, with made-up times.
#include "engine/wake_queue.h"

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

namespace guestmem {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using Time = WakeQueue::Clock::time_point;

constexpr Time kNow = Time(seconds(500));

std::vector<WakeQueue::Id> Due(WakeQueue& queue, Time now) {
  std::vector<WakeQueue::Id> due;
  queue.TakeDue(now, &due);
  return due;
}

TEST(WakeQueueTest, WakesEachSpaceAtItsDeadlineEarliestFirst) {
  WakeQueue queue;
  EXPECT_EQ(queue.earliest(), std::nullopt);
  queue.Arm(7, kNow + milliseconds(30));
  queue.Arm(3, kNow + milliseconds(10));
  queue.Arm(5, kNow + milliseconds(20));
  EXPECT_EQ(queue.earliest(), kNow + milliseconds(10));
  EXPECT_TRUE(Due(queue, kNow + milliseconds(9)).empty());
  EXPECT_EQ(Due(queue, kNow + milliseconds(20)), (std::vector<WakeQueue::Id>{3, 5}));
  EXPECT_EQ(queue.size(), 1u);
  EXPECT_EQ(Due(queue, kNow + seconds(1)), (std::vector<WakeQueue::Id>{7}));
  EXPECT_EQ(queue.size(), 0u);
  EXPECT_TRUE(Due(queue, kNow + seconds(2)).empty()) << "a deadline wakes once";
}

TEST(WakeQueueTest, ArmingAgainReplacesTheEarlierDeadline) {
  WakeQueue queue;
  queue.Arm(1, kNow + milliseconds(5));
  queue.Arm(1, kNow + milliseconds(50));  // served meanwhile; asks again, later
  queue.Arm(1, kNow + milliseconds(50));  // the same again: still one deadline
  EXPECT_EQ(queue.size(), 1u);
  EXPECT_TRUE(Due(queue, kNow + milliseconds(10)).empty());
  EXPECT_EQ(Due(queue, kNow + milliseconds(50)), (std::vector<WakeQueue::Id>{1}));
  queue.Arm(2, kNow + milliseconds(50));
  queue.Arm(2, kNow + milliseconds(1));  // sooner is fine too
  EXPECT_EQ(queue.earliest(), kNow + milliseconds(1));
}

TEST(WakeQueueTest, DisarmedSpacesAreNotWoken) {
  WakeQueue queue;
  queue.Arm(1, kNow);
  queue.Arm(2, kNow);
  queue.Disarm(1);
  queue.Disarm(9);  // never armed: nothing happens
  EXPECT_EQ(Due(queue, kNow), (std::vector<WakeQueue::Id>{2}));
  EXPECT_EQ(queue.earliest(), std::nullopt);
}

TEST(WaitTimeoutMsTest, RoundsUpSoThatTheWaitNeverEndsBeforeTheDeadline) {
  const milliseconds idle(1000);
  EXPECT_EQ(WaitTimeoutMs(std::nullopt, kNow, idle), 1000);
  EXPECT_EQ(WaitTimeoutMs(kNow + microseconds(1), kNow, idle), 1);
  EXPECT_EQ(WaitTimeoutMs(kNow + milliseconds(3), kNow, idle), 3);
  EXPECT_EQ(WaitTimeoutMs(kNow + milliseconds(3) + nanoseconds(1), kNow, idle), 4);
  EXPECT_EQ(WaitTimeoutMs(kNow + seconds(60), kNow, idle), 1000) << "at most the idle wait";
  EXPECT_EQ(WaitTimeoutMs(kNow, kNow, idle), 0);
  EXPECT_EQ(WaitTimeoutMs(kNow - seconds(1), kNow, idle), 0);
}

}  // namespace
}  // namespace guestmem
