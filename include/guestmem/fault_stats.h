// FaultStats: what a fault handler did for one VM — faults by kind, pages by how they were
// installed, bytes read from the page source, and fault service latency.
//
// A plain value: a snapshot taken with FaultHandler::stats() (safe from any thread while the
// handler serves).
#ifndef GUESTMEM_FAULT_STATS_H_
#define GUESTMEM_FAULT_STATS_H_

#include <array>
#include <cstdint>
#include <string>

namespace guestmem {

// A distribution of durations in fixed buckets, cumulative as Prometheus histograms are: bucket i
// counts the samples of at most kBoundsNs[i] nanoseconds; `count` all of them (the +Inf bucket).
struct LatencyBuckets {
  static constexpr std::array<uint64_t, 16> kBoundsNs = {
      1'000,   2'000,     5'000,     10'000,    20'000,     50'000,     100'000,     200'000,
      500'000, 1'000'000, 2'000'000, 5'000'000, 10'000'000, 50'000'000, 100'000'000, 1'000'000'000};
  std::array<uint64_t, kBoundsNs.size()> cumulative{};
  uint64_t count = 0;
  uint64_t sum_ns = 0;

  LatencyBuckets& operator+=(const LatencyBuckets& other);
};

struct FaultStats {
  // Fault events read, by kind.
  uint64_t faults_missing = 0;
  uint64_t faults_minor = 0;
  uint64_t faults_write_protect = 0;
  uint64_t faults_stray = 0;  // of those, outside the VM's declared regions
  uint64_t faults_guest = 0;  // guest (stage-2) faults posted by the VMM (secret hiding)
  // Non-fault events read.
  uint64_t events_remove = 0;
  uint64_t events_unmap = 0;
  uint64_t events_remap = 0;
  uint64_t events_fork = 0;
  // Pages (of 4 KiB) installed, by how.
  uint64_t pages_copied = 0;     // UFFDIO_COPY
  uint64_t pages_continued = 0;  // UFFDIO_CONTINUE (after writing the content into the file)
  uint64_t pages_zeroed = 0;     // UFFDIO_ZEROPAGE, or a copy of the shared zero page on hugetlb
  uint64_t pages_populated = 0;  // written into the guest memory file for guest faults (KVM maps)
  // Of those, installed ahead of faults: of the working set, and by a fill (fault-all or
  // background).
  uint64_t pages_prefetched = 0;
  uint64_t pages_filled = 0;
  // Faults on a page that the prefetch had installed by the time the fault was served (the
  // fault only needed a wake), and faults that had to install their page while a working set
  // was being prefetched or after it had been.
  uint64_t prefetch_hits = 0;
  uint64_t prefetch_misses = 0;
  uint64_t pages_poisoned = 0;  // UFFDIO_POISON after the source failed
  uint64_t bytes_read = 0;      // from the page source
  uint64_t eagain_retries = 0;  // installs retried after draining events
  uint64_t content_waits = 0;   // installs that waited for the source (a chunk being decoded)
  // Service latency of fault events: from reading the event to the faulting page installed.
  uint64_t latency_p50_ns = 0;
  uint64_t latency_p99_ns = 0;
  uint64_t latency_max_ns = 0;
  // The service of a uffd fault in three parts: waiting in the queue (read to served), fetching
  // its content from the source and installing it (the kernel's ioctls).
  LatencyBuckets queue_latency;
  LatencyBuckets fetch_latency;
  LatencyBuckets install_latency;
  // Time spent installing everything when serving in fault-all mode (0 otherwise).
  uint64_t fault_all_us = 0;
  // Turns taken (FaultHandler::Serve calls): what serving the VM cost its worker.
  uint64_t turns = 0;
  // When the first fault was served and when a fill (fault-all or background) finished, as
  // steady_clock times in nanoseconds (0: not yet), to order what happened across VMs.
  uint64_t first_fault_served_ns = 0;
  uint64_t fill_finished_ns = 0;

  uint64_t faults() const { return faults_missing + faults_minor + faults_write_protect; }
  uint64_t pages_installed() const {
    return pages_copied + pages_continued + pages_zeroed + pages_populated;
  }
  // Adds the counters and distributions of `other` (percentiles, maxima and times are not
  // summed: the larger is kept), for totals across VMs.
  FaultStats& operator+=(const FaultStats& other);
  // One line for logs: "faults=12 (missing 12) pages: copied=192 ... latency p50=31us ..."
  std::string ToString() const;
};

}  // namespace guestmem

#endif  // GUESTMEM_FAULT_STATS_H_
