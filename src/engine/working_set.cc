#include "guestmem/working_set.h"

#include <algorithm>
#include <bit>
#include <unordered_map>
#include <utility>

#include "source/kept_form.h"

namespace guestmem {
namespace {

constexpr char kMagic[9] = "GMWSET01";
constexpr uint32_t kVersion = 1;
// How much of its score a page keeps after a restore in which no fault needed it, and the score
// below which it leaves.
constexpr float kFade = 0.9f;
constexpr float kLeaveBelow = 0.5f;

uint32_t Bits(float f) { return std::bit_cast<uint32_t>(f); }
float Float(uint32_t bits) { return std::bit_cast<float>(bits); }

}  // namespace

void WorkingSetRecorder::Append(uint64_t first, uint64_t count) {
  std::lock_guard lock(mu_);
  if (count == 0) return;
  const uint64_t words = (first + count + 63) / 64;
  if (seen_.size() < words) seen_.resize(words, 0);
  for (uint64_t p = first; p < first + count; ++p) {
    uint64_t& word = seen_[p / 64];
    const uint64_t bit = uint64_t{1} << (p % 64);
    if ((word & bit) != 0) continue;
    word |= bit;
    pages_.push_back(p);
  }
}

std::vector<uint64_t> WorkingSetRecorder::Take() {
  std::lock_guard lock(mu_);
  seen_.clear();
  return std::exchange(pages_, {});
}

std::vector<uint64_t> WorkingSet::Pages() const {
  std::vector<uint64_t> pages;
  pages.reserve(entries_.size());
  for (const Entry& e : entries_) pages.push_back(e.page);
  return pages;
}

WorkingSet WorkingSet::Merge(const WorkingSet& learned, std::span<const uint64_t> needed,
                             size_t prefetched) {
  std::unordered_map<uint64_t, Entry> merged;
  merged.reserve(learned.entries_.size() + needed.size());
  for (size_t i = 0; i < learned.entries_.size(); ++i) {
    const Entry& e = learned.entries_[i];
    merged.emplace(e.page, Entry{e.page, i < prefetched ? e.score : e.score * kFade, e.rank});
  }
  const float n = static_cast<float>(std::max<size_t>(needed.size(), 1));
  for (size_t i = 0; i < needed.size(); ++i) {
    const float rank = static_cast<float>(i) / n;
    auto [it, fresh] = merged.try_emplace(needed[i], Entry{needed[i], 1, rank});
    if (!fresh) it->second = Entry{needed[i], 1, (it->second.rank + rank) / 2};
  }
  WorkingSet out;
  out.restores_ = learned.restores_ + 1;
  for (const auto& [page, e] : merged) {
    if (e.score >= kLeaveBelow) out.entries_.push_back(e);
  }
  std::sort(out.entries_.begin(), out.entries_.end(), [](const Entry& a, const Entry& b) {
    return a.rank != b.rank ? a.rank < b.rank : a.page < b.page;
  });
  return out;
}

std::string WorkingSet::Serialize(const SnapshotIdentity& identity) const {
  KeptWriter out(kMagic, kVersion);
  out.PutIdentity(identity);
  out.Put32(restores_);
  out.Put64(entries_.size());
  for (const Entry& e : entries_) {
    out.Put64(e.page);
    out.Put32(Bits(e.score));
    out.Put32(Bits(e.rank));
  }
  return out.Finish();
}

Result<WorkingSet> WorkingSet::Parse(std::span<const std::byte> bytes,
                                     const SnapshotIdentity& expected) {
  GM_ASSIGN_OR_RETURN(KeptReader in, KeptReader::Open(bytes, kMagic, kVersion, "working set"));
  auto corrupt = [](const std::string& why) {
    return Error(ErrorCode::kDataLoss, "working set: " + why);
  };
  SnapshotIdentity found;
  WorkingSet out;
  uint64_t count = 0;
  if (!in.GetIdentity(&found) || !in.Get32(&out.restores_) || !in.Get64(&count)) {
    return corrupt("cut short");
  }
  if (!(found == expected)) {
    return Error(ErrorCode::kFailedPrecondition,
                 "working set: learned of another version of the file");
  }
  const uint64_t pages = expected.file.size / kPageSize4K;
  if (count > pages || in.left() != count * 16) {
    return corrupt("its length does not match its entries");
  }
  out.entries_.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    Entry e;
    uint32_t score = 0, rank = 0;
    in.Get64(&e.page);
    in.Get32(&score);
    in.Get32(&rank);
    e.score = Float(score);
    e.rank = Float(rank);
    if (e.page >= pages) return corrupt("a page past the end of the snapshot");
    out.entries_.push_back(e);
  }
  return out;
}

}  // namespace guestmem
