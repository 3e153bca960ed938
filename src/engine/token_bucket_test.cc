// The token bucket with made-up times: no test here waits for real time to pass.
#include "engine/token_bucket.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>

namespace guestmem {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
using Time = TokenBucket::Clock::time_point;

constexpr Time kStart = Time(seconds(1000));

TEST(TokenBucketTest, StartsFullAndRefillsAtItsRate) {
  TokenBucket bucket(/*rate_per_second=*/1000, /*capacity=*/100, kStart);
  EXPECT_EQ(bucket.Available(kStart), 100u);
  bucket.Take(100, kStart);
  EXPECT_EQ(bucket.Available(kStart), 0u);
  EXPECT_EQ(bucket.Available(kStart + milliseconds(1)), 1u);
  EXPECT_EQ(bucket.Available(kStart + milliseconds(50)), 50u);
  // Never more than the capacity, however long it rests.
  EXPECT_EQ(bucket.Available(kStart + seconds(3600)), 100u);
}

TEST(TokenBucketTest, FractionsOfATokenAddUpWithoutDrift) {
  // 3 tokens a second, looked at every millisecond: a third of a millisecond's worth is never lost.
  TokenBucket bucket(3, 10, kStart);
  bucket.Take(10, kStart);
  Time now = kStart;
  for (int ms = 1; ms <= 3000; ++ms) {
    now = kStart + milliseconds(ms);
    (void)bucket.Available(now);
  }
  EXPECT_EQ(bucket.Available(now), 9u);
}

TEST(TokenBucketTest, WhenSaysTheFirstNanosecondAtWhichTokensAreThere) {
  TokenBucket bucket(1000, 100, kStart);        // one token a millisecond
  EXPECT_EQ(bucket.When(100, kStart), kStart);  // there already
  bucket.Take(100, kStart);
  const Time at = bucket.When(10, kStart);
  EXPECT_EQ(at, kStart + milliseconds(10));
  EXPECT_EQ(bucket.Available(at - nanoseconds(1)), 9u);
  EXPECT_EQ(bucket.Available(at), 10u);
  // Rounded up: 3 tokens a second, one token is there after 333333334 ns, not 333333333.
  TokenBucket slow(3, 1, kStart);
  slow.Take(1, kStart);
  EXPECT_EQ(slow.When(1, kStart), kStart + nanoseconds(333'333'334));
  EXPECT_EQ(slow.Available(kStart + nanoseconds(333'333'333)), 0u);
  EXPECT_EQ(slow.Available(kStart + nanoseconds(333'333'334)), 1u);
}

TEST(TokenBucketTest, ADebtIsPaidBackFirst) {
  TokenBucket bucket(1000, 100, kStart);
  bucket.Take(150, kStart);  // charged after the work: 50 more than there was
  EXPECT_EQ(bucket.Available(kStart), 0u);
  EXPECT_EQ(bucket.Available(kStart + milliseconds(50)), 0u);
  EXPECT_EQ(bucket.When(10, kStart + milliseconds(50)), kStart + milliseconds(60));
  EXPECT_EQ(bucket.Available(kStart + milliseconds(60)), 10u);
}

TEST(TokenBucketTest, TheAverageRateHoldsWhateverTheStepSize) {
  // A worker that takes what is there each time it comes back, at irregular times: over 10 s,
  // what it took is the capacity it started with plus 10 s of the rate, never more.
  constexpr uint64_t kRate = uint64_t{256} << 20;
  TokenBucket bucket(kRate, 4 << 20, kStart);
  uint64_t taken = 0;
  Time now = kStart;
  for (int i = 0; now < kStart + seconds(10); ++i) {
    now += nanoseconds(1 + (i * 7919) % 3'000'000);
    const uint64_t n = bucket.Available(now);
    bucket.Take(n, now);
    taken += n;
  }
  const uint64_t elapsed_ns =
      static_cast<uint64_t>(std::chrono::duration_cast<nanoseconds>(now - kStart).count());
  const uint64_t bound = (4 << 20) + kRate * elapsed_ns / 1'000'000'000;
  EXPECT_LE(taken, bound);
  EXPECT_GE(taken, bound - 2 * (kRate / 1000));  // within a few milliseconds' worth
}

TEST(TokenBucketTest, TimeGoingBackwardsCountsAsNoTime) {
  TokenBucket bucket(1000, 100, kStart);
  bucket.Take(100, kStart + milliseconds(20));
  EXPECT_EQ(bucket.Available(kStart), 0u);
  EXPECT_EQ(bucket.Available(kStart + milliseconds(25)), 5u);
}

TEST(TokenBucketTest, ExtremeRatesAndPausesDoNotOverflow) {
  TokenBucket fast(UINT64_MAX, UINT64_MAX, kStart);
  fast.Take(UINT64_MAX, kStart);
  EXPECT_EQ(fast.Available(kStart + seconds(100'000'000)), UINT64_MAX);
  TokenBucket slow(1, 1, kStart);
  slow.Take(UINT64_MAX, kStart);  // a debt no lifetime pays back
  const Time at = slow.When(1, kStart);
  EXPECT_GT(at, kStart + seconds(3600));
  EXPECT_EQ(slow.Available(at), 0u);
  // More than the capacity is treated as the capacity: the answer is a time that comes.
  TokenBucket small(1000, 10, kStart);
  small.Take(10, kStart);
  EXPECT_EQ(small.When(1'000'000, kStart), kStart + milliseconds(10));
}

}  // namespace
}  // namespace guestmem
