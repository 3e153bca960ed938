#include "serve/working_sets.h"

#include <algorithm>

namespace guestmem::cli {

void WorkingSets::Learn(const FileIdentity& snapshot, const PageTracker& tracker) {
  auto set = std::make_shared<WorkingSet>();
  const uint64_t count = tracker.page_count();
  for (uint64_t p = 0; p < count;) {
    if (tracker.Fate(p) != PageFate::kServed) {
      ++p;
      continue;
    }
    uint64_t end = p + 1;
    while (end < count && tracker.Fate(end) == PageFate::kServed) ++end;
    set->runs.push_back({p, end});
    set->pages += end - p;
    p = end;
  }
  std::erase_if(sets_, [&](const auto& entry) { return entry.first == snapshot; });
  if (set->pages == 0) return;
  if (sets_.size() >= kSnapshots) sets_.pop_front();
  sets_.emplace_back(snapshot, std::move(set));
}

std::shared_ptr<const WorkingSet> WorkingSets::Find(const FileIdentity& snapshot) const {
  for (const auto& [identity, set] : sets_) {
    if (identity == snapshot) return set;
  }
  return nullptr;
}

std::vector<GuestFault> PrefetchFaults(const WorkingSet& set,
                                       std::span<const HandshakeRegion> regions,
                                       uint64_t window_bytes, const PageTracker& tracker) {
  std::vector<GuestFault> faults;
  for (const HandshakeRegion& r : regions) {
    const uint64_t region_first = r.offset / kPageSize4K;
    const uint64_t region_end = (r.offset + r.size) / kPageSize4K;
    const uint64_t window_pages = std::max<uint64_t>(window_bytes / kPageSize4K, 1);
    uint64_t next = region_first;  // the first page not yet covered by a planned window
    for (const PageRun& run : set.runs) {
      const uint64_t first = std::max({run.first, region_first, next});
      const uint64_t end = std::min({run.end, region_end, tracker.page_count()});
      for (uint64_t p = first; p < end;) {
        p = tracker.NextPending(p, end);
        if (p >= end) break;
        const uint64_t in_region = p - region_first;
        const uint64_t window_end = region_first + (in_region / window_pages + 1) * window_pages;
        faults.push_back(GuestFault{
            .vcpu = 0,
            .flags = 0,
            .gpa = GuestPhysAddr(r.gpa_start.value_or(r.offset) + in_region * kPageSize4K),
            .prefetch = true});
        p = window_end;
        next = window_end;
      }
    }
  }
  return faults;
}

}  // namespace guestmem::cli
