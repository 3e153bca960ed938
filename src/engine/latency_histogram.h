// LatencyHistogram: a fixed-size, lock-free histogram of durations in nanoseconds with ~6%
// relative error (log2 buckets split into 16 linear sub-buckets), for p50/p99/max of fault
// service times without storing samples.
//
// Thread safety: Record() from one or many threads; Percentile()/max() from any thread (they read
// a slightly stale but per-bucket consistent view).
#ifndef GUESTMEM_ENGINE_LATENCY_HISTOGRAM_H_
#define GUESTMEM_ENGINE_LATENCY_HISTOGRAM_H_

#include <array>
#include <atomic>
#include <cstdint>

#include "guestmem/fault_stats.h"

namespace guestmem {

// BucketHistogram: durations counted in LatencyBuckets' fixed buckets, exactly (a sample on a
// bound counts in that bound's bucket), with their sum: what a Prometheus histogram exports.
// Thread safety: Record() from one or many threads; Snapshot() from any thread.
class BucketHistogram {
 public:
  void Record(uint64_t nanos);
  LatencyBuckets Snapshot() const;

 private:
  // counts_[i]: samples in (kBoundsNs[i-1], kBoundsNs[i]]; the last one those above every bound.
  std::array<std::atomic<uint64_t>, LatencyBuckets::kBoundsNs.size() + 1> counts_{};
  std::atomic<uint64_t> sum_ns_{0};
};

class LatencyHistogram {
 public:
  void Record(uint64_t nanos);
  // The smallest recorded-bucket upper bound covering `fraction` (0..1] of samples; 0 if empty.
  uint64_t Percentile(double fraction) const;
  uint64_t max() const { return max_.load(std::memory_order_relaxed); }
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  static constexpr int kSubBits = 4;
  static constexpr int kSubBuckets = 1 << kSubBits;
  static constexpr int kBuckets = (64 - kSubBits + 1) * kSubBuckets;
  static int BucketOf(uint64_t nanos);
  static uint64_t UpperBoundOf(int bucket);

  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> max_{0};
};

}  // namespace guestmem

#endif  // GUESTMEM_ENGINE_LATENCY_HISTOGRAM_H_
