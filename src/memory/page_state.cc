#include "guestmem/page_state.h"

#include <bit>
#include <cassert>

namespace guestmem {
namespace {

constexpr uint64_t kPagesPerWord = 32;
constexpr uint64_t kLowBits = 0x5555555555555555ULL;  // bit 0 of every 2-bit slot

// Every slot of a word set to `state`.
constexpr uint64_t Splat(PageState state) { return kLowBits * static_cast<uint64_t>(state); }

// The 2-bit slots [first_slot, first_slot + count) of a word, as a mask.
constexpr uint64_t SlotMask(uint64_t first_slot, uint64_t count) {
  const uint64_t bits = count * 2;
  const uint64_t mask = bits == 64 ? ~uint64_t{0} : ((uint64_t{1} << bits) - 1);
  return mask << (first_slot * 2);
}

// One bit (the slot's low bit) set for each slot of `word` equal to `state`.
constexpr uint64_t SlotsEqual(uint64_t word, PageState state) {
  const uint64_t diff = word ^ Splat(state);         // 00 where equal
  return ~(diff | (diff >> 1)) & kLowBits;
}

// Applies `transform` (old word -> new word, restricted to `mask`) with a CAS loop; returns the
// old word.
template <typename Transform>
uint64_t Update(std::atomic<uint64_t>& word, uint64_t mask, Transform transform) {
  uint64_t old = word.load(std::memory_order_relaxed);
  while (true) {
    const uint64_t updated = (old & ~mask) | (transform(old) & mask);
    if (updated == old) return old;
    if (word.compare_exchange_weak(old, updated, std::memory_order_acq_rel,
                                   std::memory_order_relaxed)) {
      return old;
    }
  }
}

}  // namespace

std::string_view PageStateName(PageState state) {
  switch (state) {
    case PageState::kAbsent: return "absent";
    case PageState::kAllocated: return "allocated";
    case PageState::kPrepared: return "prepared";
    case PageState::kRemoved: return "removed";
  }
  return "?";
}

PageStateMap::PageStateMap(uint64_t page_count)
    : page_count_(page_count),
      word_count_((page_count + kPagesPerWord - 1) / kPagesPerWord),
      words_(new std::atomic<uint64_t>[word_count_ == 0 ? 1 : word_count_]()) {}

PageState PageStateMap::Get(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = words_[page / kPagesPerWord].load(std::memory_order_acquire);
  return static_cast<PageState>((word >> ((page % kPagesPerWord) * 2)) & 3);
}

// Calls fn(word_index, mask) for each word the range touches.
template <typename Fn>
static void ForEachWord(uint64_t first, uint64_t count, Fn fn) {
  uint64_t page = first;
  const uint64_t end = first + count;
  while (page < end) {
    const uint64_t slot = page % kPagesPerWord;
    const uint64_t n = std::min(kPagesPerWord - slot, end - page);
    fn(page / kPagesPerWord, SlotMask(slot, n));
    page += n;
  }
}

void PageStateMap::Set(uint64_t first, uint64_t count, PageState state) {
  assert(first + count <= page_count_);
  const uint64_t value = Splat(state);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    if (mask == ~uint64_t{0}) {
      words_[w].store(value, std::memory_order_release);
    } else {
      Update(words_[w], mask, [&](uint64_t) { return value; });
    }
  });
}

uint64_t PageStateMap::MarkAllocated(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  uint64_t changed = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    // absent (00) -> allocated (01); removed (11) -> allocated (01): clear the high bit of
    // removed slots, set the low bit of absent slots.
    const uint64_t old = Update(words_[w], mask, [](uint64_t v) {
      const uint64_t absent = SlotsEqual(v, PageState::kAbsent);
      const uint64_t removed = SlotsEqual(v, PageState::kRemoved);
      return (v | absent) & ~(removed << 1);
    });
    changed += std::popcount((SlotsEqual(old, PageState::kAbsent) |
                              SlotsEqual(old, PageState::kRemoved)) & mask);
  });
  return changed;
}

uint64_t PageStateMap::MarkPrepared(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  uint64_t changed = 0;
  const uint64_t value = Splat(PageState::kPrepared);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    const uint64_t old = Update(words_[w], mask, [&](uint64_t) { return value; });
    changed += std::popcount(~SlotsEqual(old, PageState::kPrepared) & kLowBits & mask);
  });
  return changed;
}

bool PageStateMap::TryMarkPrepared(uint64_t page) {
  assert(page < page_count_);
  const uint64_t mask = SlotMask(page % kPagesPerWord, 1);
  const uint64_t old = Update(words_[page / kPagesPerWord], mask,
                              [](uint64_t) { return Splat(PageState::kPrepared); });
  return (SlotsEqual(old, PageState::kPrepared) & mask) == 0;
}

uint64_t PageStateMap::MarkPunched(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  uint64_t released = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    // prepared (10) -> removed (11): set the low bit; allocated (01) -> absent (00): clear it.
    const uint64_t old = Update(words_[w], mask, [](uint64_t v) {
      const uint64_t prepared = SlotsEqual(v, PageState::kPrepared);
      const uint64_t allocated = SlotsEqual(v, PageState::kAllocated);
      return (v | prepared) & ~allocated;
    });
    released += std::popcount(SlotsEqual(old, PageState::kPrepared) & mask);
  });
  return released;
}

uint64_t PageStateMap::CountInState(uint64_t first, uint64_t count, PageState state) const {
  assert(first + count <= page_count_);
  uint64_t total = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    total += std::popcount(SlotsEqual(words_[w].load(std::memory_order_acquire), state) & mask);
  });
  return total;
}

// The first page in [first, end) whose slot is (want_prepared) or is not kPrepared.
static uint64_t FindPrepared(const std::atomic<uint64_t>* words, uint64_t first, uint64_t end,
                             bool want_prepared) {
  uint64_t page = first;
  while (page < end) {
    const uint64_t slot = page % kPagesPerWord;
    const uint64_t n = std::min(kPagesPerWord - slot, end - page);
    const uint64_t mask = SlotMask(slot, n) & kLowBits;
    const uint64_t prepared =
        SlotsEqual(words[page / kPagesPerWord].load(std::memory_order_acquire), PageState::kPrepared);
    const uint64_t hits = (want_prepared ? prepared : ~prepared) & mask;
    if (hits != 0) return page - slot + static_cast<uint64_t>(std::countr_zero(hits)) / 2;
    page += n;
  }
  return end;
}

uint64_t PageStateMap::NextPrepared(uint64_t first, uint64_t end) const {
  assert(first <= end && end <= page_count_);
  return FindPrepared(words_.get(), first, end, true);
}

uint64_t PageStateMap::NextNotPrepared(uint64_t first, uint64_t end) const {
  assert(first <= end && end <= page_count_);
  return FindPrepared(words_.get(), first, end, false);
}

}  // namespace guestmem
