#include "engine/latency_histogram.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace guestmem {
namespace {

TEST(LatencyHistogramTest, EmptyReportsZero) {
  LatencyHistogram h;
  EXPECT_EQ(h.Percentile(0.5), 0u);
  EXPECT_EQ(h.max(), 0u);
}

TEST(LatencyHistogramTest, PercentilesWithinBucketError) {
  LatencyHistogram h;
  // 1..10000 us uniformly: p50 ~ 5000us, p99 ~ 9900us, max exact.
  for (uint64_t us = 1; us <= 10000; ++us) h.Record(us * 1000);
  EXPECT_EQ(h.count(), 10000u);
  EXPECT_EQ(h.max(), 10000u * 1000);
  auto near = [](uint64_t got, double want) {
    return static_cast<double>(got) >= want * 0.99 && static_cast<double>(got) <= want * 1.07;
  };
  EXPECT_TRUE(near(h.Percentile(0.5), 5000e3)) << h.Percentile(0.5);
  EXPECT_TRUE(near(h.Percentile(0.99), 9900e3)) << h.Percentile(0.99);
  EXPECT_EQ(h.Percentile(1.0), h.max());
}

TEST(LatencyHistogramTest, SmallValuesExact) {
  LatencyHistogram h;
  for (uint64_t v : {3, 3, 3, 7}) h.Record(v);
  EXPECT_EQ(h.Percentile(0.5), 3u);
  EXPECT_EQ(h.Percentile(1.0), 7u);
}

TEST(LatencyHistogramTest, ConcurrentRecordsAllCounted) {
  LatencyHistogram h;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&h, t] {
      for (int i = 0; i < 10000; ++i) h.Record(static_cast<uint64_t>(1000 * (t + 1)));
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(h.count(), 40000u);
  EXPECT_EQ(h.max(), 4000u);
}

TEST(BucketHistogramTest, CountsCumulativelyWithSamplesOnABoundInThatBucket) {
  BucketHistogram h;
  h.Record(1'000);          // on the first bound: le=1us
  h.Record(1'001);          // just above: le=2us
  h.Record(7'000);          // le=10us
  h.Record(5'000'000'000);  // above every bound: only +Inf
  const LatencyBuckets b = h.Snapshot();
  EXPECT_EQ(b.count, 4u);
  EXPECT_EQ(b.sum_ns, 1'000u + 1'001u + 7'000u + 5'000'000'000u);
  EXPECT_EQ(b.cumulative[0], 1u);  // 1us
  EXPECT_EQ(b.cumulative[1], 2u);  // 2us
  EXPECT_EQ(b.cumulative[2], 2u);  // 5us
  EXPECT_EQ(b.cumulative[3], 3u);  // 10us
  EXPECT_EQ(b.cumulative.back(), 3u);
}

TEST(BucketHistogramTest, SnapshotsAdd) {
  BucketHistogram a, b;
  a.Record(3'000);
  b.Record(3'000);
  b.Record(30'000);
  LatencyBuckets sum = a.Snapshot();
  sum += b.Snapshot();
  EXPECT_EQ(sum.count, 3u);
  EXPECT_EQ(sum.cumulative[2], 2u);  // 5us
  EXPECT_EQ(sum.cumulative[5], 3u);  // 50us
  EXPECT_EQ(sum.sum_ns, 36'000u);
}

}  // namespace
}  // namespace guestmem
