// WorkingSet: the pages a snapshot's restores need, learned across restores (REAP, FaaSnap).
//
// While a VM restores, its handler records each page it had to install for a fault, in the order
// the faults came (WorkingSetRecorder). When the VM is gone, the recording is merged into what was
// learned of the snapshot before (Merge), and the next restore of that snapshot installs the
// learned pages in bulk, in that order, from the moment its handshake is validated, while its
// faults are served first — so that most of them never fault.
//
// Learning: every page needed by a fault in the latest restore is in, ranked by when it was first
// needed (averaged with its rank in earlier restores). A page the restore installed ahead of time
// never faults, so nothing says whether the guest used it: it keeps its score. A learned page the
// restore neither installed ahead of time (it ended before the prefetch got there) nor needed
// fades (its score loses a tenth) and leaves once it falls below a half, unless a fault needs it
// again. A snapshot's restores differ little (REAP found > 97% of
// the working set stable), so the set follows them without growing without bound.
//
// The binary form (Serialize/Parse) is kept per snapshot in the SnapshotCache, with the
// snapshot's identity and a checksum; a stale or corrupt one is never used.
//
// Thread safety: a WorkingSet is a value (immutable once made, safe to share); a
// WorkingSetRecorder may be appended to and taken from any thread.
#ifndef GUESTMEM_WORKING_SET_H_
#define GUESTMEM_WORKING_SET_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/zero_map.h"

namespace guestmem {

class WorkingSetRecorder {
 public:
  // Records pages [first, first + count) (4 KiB indexes into the snapshot) as needed now; a page
  // recorded before is not recorded again, so that what a recorder holds is bounded by the
  // snapshot's pages however often a VM balloons and faults the same pages back.
  void Append(uint64_t first, uint64_t count);
  // What was recorded, in order, each page once; the recorder starts empty again.
  std::vector<uint64_t> Take();

  // The prefetch got through the first `count` pages of the working set it was given.
  void NotePrefetched(size_t count) { prefetched_.store(count, std::memory_order_relaxed); }
  size_t prefetched() const { return prefetched_.load(std::memory_order_relaxed); }

 private:
  std::mutex mu_;
  std::vector<uint64_t> pages_;  // GUARDED_BY(mu_)
  std::vector<uint64_t> seen_;   // GUARDED_BY(mu_): a bit per page recorded
  std::atomic<size_t> prefetched_{0};
};

class WorkingSet {
 public:
  struct Entry {
    uint64_t page = 0;
    float score = 1;  // 1 when a fault needed it in the latest restore
    float rank = 0;   // when it was first needed, as a fraction of its restore (averaged)
  };

  WorkingSet() = default;

  // The pages, in the order a restore should install them.
  std::vector<uint64_t> Pages() const;
  const std::vector<Entry>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  uint32_t restores() const { return restores_; }

  // What `learned` becomes after one more restore that recorded `needed` (the pages its faults
  // needed, in first-need order) and prefetched the first `prefetched` of learned.Pages(): see
  // the header comment.
  static WorkingSet Merge(const WorkingSet& learned, std::span<const uint64_t> needed,
                          size_t prefetched = 0);

  std::string Serialize(const SnapshotIdentity& identity) const;
  // ERRORS: kDataLoss for a torn or corrupt form; kFailedPrecondition for another identity.
  static Result<WorkingSet> Parse(std::span<const std::byte> bytes,
                                  const SnapshotIdentity& expected);

 private:
  std::vector<Entry> entries_;  // sorted by rank
  uint32_t restores_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_WORKING_SET_H_
