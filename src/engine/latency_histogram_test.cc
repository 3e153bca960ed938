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

}  // namespace
}  // namespace guestmem
