#include "guestmem/working_set_learner.h"

#include <algorithm>

#include "guestmem/log.h"

namespace guestmem {

WorkingSetLearner::Known* WorkingSetLearner::Find(const RawFileSource& snapshot,
                                                  std::span<const uint64_t> seed) {
  const FileIdentity& file = snapshot.identity();
  ++uses_;
  for (Known& k : known_) {
    if (k.identity.file == file) {
      k.last_used = uses_;
      return &k;
    }
  }
  auto identity = IdentifySnapshot(snapshot);
  if (!identity) {
    Log(LogLevel::kWarning, "working set of " + snapshot.path() + ": " +
                                identity.error().ToString() + "; nothing is learned of it");
    return nullptr;
  }
  if (known_.size() >= kMaxSnapshots) {
    known_.erase(std::min_element(known_.begin(), known_.end(), [](const Known& a, const Known& b) {
      return a.last_used < b.last_used;
    }));
  }
  Known fresh{.identity = *identity, .last_used = uses_};
  if (cache_ != nullptr) {
    if (auto kept = cache_->WorkingSetFor(*identity); kept) {
      Log(LogLevel::kInfo, "working set of " + snapshot.path() + ": " +
                               std::to_string(kept->size()) + " pages learned over " +
                               std::to_string(kept->restores()) + " restores");
      fresh.learned = std::make_shared<const WorkingSet>(std::move(*kept));
    }
  }
  if (fresh.learned == nullptr && !seed.empty()) {
    Log(LogLevel::kInfo, "working set of " + snapshot.path() + ": " + std::to_string(seed.size()) +
                             " pages, as the snapshot carries it");
    fresh.learned = std::make_shared<const WorkingSet>(WorkingSet::Merge(WorkingSet(), seed));
  }
  known_.push_back(std::move(fresh));
  return &known_.back();
}

std::shared_ptr<const WorkingSet> WorkingSetLearner::LearnedFor(const RawFileSource& snapshot,
                                                                std::span<const uint64_t> seed) {
  std::lock_guard lock(mu_);
  Known* k = Find(snapshot, seed);
  return k != nullptr ? k->learned : nullptr;
}

std::shared_ptr<const WorkingSet> WorkingSetLearner::Learn(const RawFileSource& snapshot,
                                                           std::span<const uint64_t> needed,
                                                           size_t prefetched) {
  std::lock_guard lock(mu_);
  Known* k = Find(snapshot, {});
  if (k == nullptr) return nullptr;
  const WorkingSet before = k->learned != nullptr ? *k->learned : WorkingSet();
  k->learned = std::make_shared<const WorkingSet>(WorkingSet::Merge(before, needed, prefetched));
  if (cache_ != nullptr) {
    if (Status kept = cache_->KeepWorkingSet(k->identity, *k->learned); !kept) {
      Log(LogLevel::kWarning,
          "working set of " + snapshot.path() + " not kept: " + kept.error().ToString());
    }
  }
  return k->learned;
}

}  // namespace guestmem
