// WorkingSets: the pages each snapshot's last secret-hiding VM had populated when it ended, so that
// the next VM restored from that snapshot gets them into its guest memory file, and their userfault
// bits cleared, before its vCPUs ask: every page of a learned set a vCPU would otherwise exit for.
//
// A set is learned from the VM's page tracker (its served pages, fault-around windows and fills
// included) and kept as runs of file pages, keyed by the snapshot file's identity (device, inode,
// size, times: a snapshot written again is another snapshot). At most kSnapshots sets are kept,
// the least recently learned dropped first. PrefetchFaults() turns a set into the guest faults that
// bring it in, one a fault-around window, skipping pages already served.
//
// Learning walks the VM's tracker once, page by page, when the VM ends (some 10 ms for 32 GiB); a
// set holds one run per stretch of served pages.
//
// Thread safety: WorkingSets from one thread (the server loop); PrefetchFaults is a pure function.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_WORKING_SETS_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_WORKING_SETS_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "guestmem/fault_handler.h"
#include "guestmem/handshake.h"
#include "guestmem/page_source.h"
#include "guestmem/page_tracker.h"

namespace guestmem::cli {

// File pages [first, end), 4 KiB each.
struct PageRun {
  uint64_t first = 0;
  uint64_t end = 0;
  bool operator==(const PageRun&) const = default;
};

struct WorkingSet {
  std::vector<PageRun> runs;  // sorted, disjoint, not adjacent
  uint64_t pages = 0;
};

class WorkingSets {
 public:
  static constexpr size_t kSnapshots = 16;

  // Learns the served pages of `tracker` as the set of `snapshot`, replacing what was known of it
  // (an empty set forgets it).
  void Learn(const FileIdentity& snapshot, const PageTracker& tracker);
  // The set learned for `snapshot`, or null.
  std::shared_ptr<const WorkingSet> Find(const FileIdentity& snapshot) const;
  size_t size() const { return sets_.size(); }

 private:
  std::deque<std::pair<FileIdentity, std::shared_ptr<const WorkingSet>>> sets_;  // oldest first
};

// The guest faults that bring `set` into a VM laid out as `regions`: for each window of
// `window_bytes` (aligned in its region, as the fault handler's fault-around aligns it) that holds
// a page of the set still pending in `tracker`, one fault at the first such page. Pages outside
// every region are skipped. REQUIRES: window_bytes a power of two >= 4096.
std::vector<GuestFault> PrefetchFaults(const WorkingSet& set,
                                       std::span<const HandshakeRegion> regions,
                                       uint64_t window_bytes, const PageTracker& tracker);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_WORKING_SETS_H_
