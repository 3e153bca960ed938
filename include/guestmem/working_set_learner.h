// WorkingSetLearner: what a daemon has learned of each snapshot it serves, kept in memory and in
// a SnapshotCache between runs.
//
// LearnedFor() gives the working set a new restore of a snapshot should prefetch (loaded from the
// cache the first time a snapshot is seen); Learn() merges what one restore recorded into it and
// keeps the result. A snapshot is known by its identity (file, size, time stamps, sampled
// content), so a memory file that is rewritten starts learning anew.
//
// Thread safety: methods may be called from many threads.
#ifndef GUESTMEM_WORKING_SET_LEARNER_H_
#define GUESTMEM_WORKING_SET_LEARNER_H_

#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "guestmem/page_source.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/working_set.h"

namespace guestmem {

class WorkingSetLearner {
 public:
  // `cache` (may be null: nothing outlives the learner) must outlive it.
  explicit WorkingSetLearner(const SnapshotCache* cache) : cache_(cache) {}

  // What was learned of `snapshot`; null when nothing was yet (or its identity cannot be read).
  // `seed`: the working set the snapshot carries (a packed snapshot's), taken as learned when the
  // snapshot is first seen and nothing is cached for it.
  std::shared_ptr<const WorkingSet> LearnedFor(const RawFileSource& snapshot,
                                               std::span<const uint64_t> seed = {});

  // Merges one restore of `snapshot` — the pages its faults needed, in first-need order, and how
  // many of the working set it was given its prefetch got through — into what was learned, and
  // keeps the result. Returns it.
  std::shared_ptr<const WorkingSet> Learn(const RawFileSource& snapshot,
                                          std::span<const uint64_t> needed, size_t prefetched);

  // Snapshots known at once; the one seen least recently is forgotten (its set stays cached).
  static constexpr size_t kMaxSnapshots = 16;

 private:
  struct Known {
    SnapshotIdentity identity;
    std::shared_ptr<const WorkingSet> learned;  // null: nothing learned yet
    uint64_t last_used = 0;
  };
  // The entry of `snapshot`, loading what the cache holds the first time. Null when its identity
  // cannot be read.
  Known* Find(const RawFileSource& snapshot, std::span<const uint64_t> seed);  // REQUIRES(mu_)

  const SnapshotCache* cache_;
  std::mutex mu_;
  std::vector<Known> known_;  // GUARDED_BY(mu_)
  uint64_t uses_ = 0;         // GUARDED_BY(mu_)
};

}  // namespace guestmem

#endif  // GUESTMEM_WORKING_SET_LEARNER_H_
