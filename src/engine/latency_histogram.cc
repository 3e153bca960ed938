#include "engine/latency_histogram.h"

#include <algorithm>
#include <bit>

namespace guestmem {

int LatencyHistogram::BucketOf(uint64_t nanos) {
  if (nanos < kSubBuckets) return static_cast<int>(nanos);
  // The top set bit picks the power of two; the next kSubBits bits pick the linear sub-bucket.
  int top = 63 - std::countl_zero(nanos);
  int shift = top - kSubBits;
  uint64_t sub = (nanos >> shift) & (kSubBuckets - 1);
  return (shift + 1) * kSubBuckets + static_cast<int>(sub);
}

uint64_t LatencyHistogram::UpperBoundOf(int bucket) {
  if (bucket < kSubBuckets) return static_cast<uint64_t>(bucket);
  int shift = bucket / kSubBuckets - 1;
  uint64_t sub = static_cast<uint64_t>(bucket % kSubBuckets);
  uint64_t base = (uint64_t{kSubBuckets} | sub) << shift;
  return base + ((uint64_t{1} << shift) - 1);
}

void LatencyHistogram::Record(uint64_t nanos) {
  counts_[static_cast<size_t>(BucketOf(nanos))].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  uint64_t prev = max_.load(std::memory_order_relaxed);
  while (nanos > prev && !max_.compare_exchange_weak(prev, nanos, std::memory_order_relaxed)) {
  }
}

uint64_t LatencyHistogram::Percentile(double fraction) const {
  uint64_t total = count();
  if (total == 0) return 0;
  auto wanted = static_cast<uint64_t>(fraction * static_cast<double>(total) + 0.5);
  if (wanted == 0) wanted = 1;
  uint64_t seen = 0;
  for (int b = 0; b < kBuckets; ++b) {
    seen += counts_[static_cast<size_t>(b)].load(std::memory_order_relaxed);
    if (seen >= wanted) {
      uint64_t bound = UpperBoundOf(b);
      return bound < max() ? bound : max();
    }
  }
  return max();
}

void BucketHistogram::Record(uint64_t nanos) {
  const auto& bounds = LatencyBuckets::kBoundsNs;
  const auto at = std::lower_bound(bounds.begin(), bounds.end(), nanos) - bounds.begin();
  counts_[static_cast<size_t>(at)].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(nanos, std::memory_order_relaxed);
}

LatencyBuckets BucketHistogram::Snapshot() const {
  LatencyBuckets out;
  uint64_t seen = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    seen += counts_[i].load(std::memory_order_relaxed);
    if (i < out.cumulative.size()) out.cumulative[i] = seen;
  }
  out.count = seen;
  out.sum_ns = sum_ns_.load(std::memory_order_relaxed);
  return out;
}

LatencyBuckets& LatencyBuckets::operator+=(const LatencyBuckets& other) {
  for (size_t i = 0; i < cumulative.size(); ++i) cumulative[i] += other.cumulative[i];
  count += other.count;
  sum_ns += other.sum_ns;
  return *this;
}

}  // namespace guestmem
