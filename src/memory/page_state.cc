#include "guestmem/page_state.h"

#include <bit>
#include <cassert>

#include "base/two_bit_slots.h"

namespace guestmem {
namespace {

// Page p lives in word p / 32, in slot p % 32 (two_bit_slots.h). The encoding of PageState makes
// the states bit patterns: absent 00, allocated 01, prepared 10, removed 11 (high bit, low bit).
constexpr uint64_t kPagesPerWord = slots::kPerWord;
constexpr uint64_t kAllSlots = slots::kAll;
constexpr uint64_t kLowBits = slots::kLowBits;

constexpr uint64_t Splat(PageState state) { return slots::Splat(static_cast<uint64_t>(state)); }
constexpr uint64_t kAllPrepared = Splat(PageState::kPrepared);

constexpr uint64_t SlotsIn(uint64_t word, PageState state) {
  return slots::SlotsHolding(word, static_cast<uint64_t>(state));
}

#if defined(__POPCNT__)
constexpr bool kTargetHasPopcnt = true;
#else
constexpr bool kTargetHasPopcnt = false;
#endif

// The number of set bits of `bits`, which has bits only in slot low-bit positions. With
// kHardware, std::popcount (one instruction where the target has popcnt). Otherwise a
// bit-parallel sum that starts from 2-bit fields, each of which already holds its own count (0 or
// 1); it beats the library call that std::popcount becomes on targets without popcnt.
template <bool kHardware = kTargetHasPopcnt>
constexpr uint64_t CountSlots(uint64_t bits) {
  if constexpr (kHardware) {
    return static_cast<uint64_t>(std::popcount(bits));
  } else {
    bits = (bits & 0x3333333333333333ULL) + ((bits >> 2) & 0x3333333333333333ULL);
    bits = (bits + (bits >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (bits * 0x0101010101010101ULL) >> 56;
  }
}

using slots::ForEachWord;

// Replaces the slots of `word` selected by `mask` with those of transform(old word), atomically;
// returns the old word. Does not write when nothing would change.
template <typename Transform>
uint64_t Update(std::atomic<uint64_t>& word, uint64_t mask, Transform transform) {
  uint64_t old = word.load(std::memory_order_acquire);
  while (true) {
    const uint64_t updated = (old & ~mask) | (transform(old) & mask);
    if (updated == old) return old;
    if (word.compare_exchange_weak(old, updated, std::memory_order_acq_rel,
                                   std::memory_order_acquire)) {
      return old;
    }
  }
}

// The per-slot transitions, as whole-word functions of the old word.
// MarkAllocated: prepared stays 10, every other state becomes 01.
constexpr uint64_t ToAllocated(uint64_t word) {
  const uint64_t prepared = SlotsIn(word, PageState::kPrepared);
  return (prepared << 1) | (~prepared & kLowBits);
}
// MarkPunched: the low bit becomes a copy of the high bit (10 -> 11, 01 -> 00, 00 and 11 stay).
constexpr uint64_t ToPunched(uint64_t word) {
  const uint64_t hi = word & ~kLowBits;
  return hi | (hi >> 1);
}

// The first page in [first, end) that is (want_prepared) or is not kPrepared, or `end`.
uint64_t FindPrepared(const std::atomic<uint64_t>* words, uint64_t first, uint64_t end,
                      bool want_prepared) {
  if (first >= end) return end;
  const uint64_t last_word = (end - 1) / kPagesPerWord;
  uint64_t w = first / kPagesPerWord;
  uint64_t mask = kAllSlots << (2 * (first % kPagesPerWord));
  while (true) {
    const uint64_t word = words[w].load(std::memory_order_acquire);
    const uint64_t prepared = SlotsIn(word, PageState::kPrepared);
    const uint64_t hits = (want_prepared ? prepared : ~prepared & kLowBits) & mask;
    if (hits != 0) {
      const uint64_t page = w * kPagesPerWord + static_cast<uint64_t>(std::countr_zero(hits)) / 2;
      return page < end ? page : end;
    }
    if (w == last_word) return end;
    ++w;
    mask = kAllSlots;
    // Skip whole words with nothing to find.
    if (want_prepared) {
      while (w < last_word &&
             SlotsIn(words[w].load(std::memory_order_acquire), PageState::kPrepared) == 0) {
        ++w;
      }
    } else {
      while (w < last_word && words[w].load(std::memory_order_acquire) == kAllPrepared) ++w;
    }
  }
}

// The pages of [first, first + count) in `state`.
template <bool kHardware>
uint64_t CountRange(const std::atomic<uint64_t>* words, uint64_t first, uint64_t count,
                    PageState state) {
  uint64_t total = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    total += CountSlots<kHardware>(SlotsIn(words[w].load(std::memory_order_acquire), state) & mask);
  });
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
// The baseline x86-64 target lacks popcnt, but nearly every x86-64 CPU has it: counting over long
// ranges uses it when the CPU does (checked once), which is about 1.7 times as fast.
#define GUESTMEM_POPCNT_AT_RUN_TIME 1
[[gnu::target("popcnt"), gnu::flatten]] uint64_t CountRangeWithPopcnt(
    const std::atomic<uint64_t>* words, uint64_t first, uint64_t count, PageState state) {
  return CountRange<true>(words, first, count, state);
}

bool CpuHasPopcnt() {
  static const bool has_popcnt = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt") != 0;
  }();
  return has_popcnt;
}
#endif

}  // namespace

std::string_view PageStateName(PageState state) {
  switch (state) {
    case PageState::kAbsent:
      return "absent";
    case PageState::kAllocated:
      return "allocated";
    case PageState::kPrepared:
      return "prepared";
    case PageState::kRemoved:
      return "removed";
  }
  return "invalid";
}

PageStateMap::PageStateMap(uint64_t page_count)
    : page_count_(page_count),
      word_count_((page_count + kPagesPerWord - 1) / kPagesPerWord),
      words_(new std::atomic<uint64_t>[word_count_]()) {}

PageState PageStateMap::Get(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = words_[page / kPagesPerWord].load(std::memory_order_acquire);
  return static_cast<PageState>((word >> (2 * (page % kPagesPerWord))) & 3);
}

void PageStateMap::Set(uint64_t first, uint64_t count, PageState state) {
  assert(first <= page_count_ && count <= page_count_ - first);
  const uint64_t value = Splat(state);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    if (mask == kAllSlots) {
      words_[w].store(value, std::memory_order_release);
    } else {
      Update(words_[w], mask, [value](uint64_t) { return value; });
    }
  });
}

uint64_t PageStateMap::MarkAllocated(uint64_t first, uint64_t count) {
  assert(first <= page_count_ && count <= page_count_ - first);
  uint64_t changed = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    const uint64_t old = Update(words_[w], mask, ToAllocated);
    changed +=
        CountSlots((SlotsIn(old, PageState::kAbsent) | SlotsIn(old, PageState::kRemoved)) & mask);
  });
  return changed;
}

uint64_t PageStateMap::MarkPrepared(uint64_t first, uint64_t count) {
  assert(first <= page_count_ && count <= page_count_ - first);
  uint64_t changed = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    uint64_t old;
    if (mask == kAllSlots) {
      // Whole word: one exchange, skipped when the word is prepared already.
      old = words_[w].load(std::memory_order_acquire);
      if (old != kAllPrepared) old = words_[w].exchange(kAllPrepared, std::memory_order_acq_rel);
    } else {
      old = Update(words_[w], mask, [](uint64_t) { return kAllPrepared; });
    }
    changed += CountSlots(~SlotsIn(old, PageState::kPrepared) & kLowBits & mask);
  });
  return changed;
}

bool PageStateMap::TryMarkPrepared(uint64_t page) {
  assert(page < page_count_);
  std::atomic<uint64_t>& word = words_[page / kPagesPerWord];
  const unsigned shift = 2 * (page % kPagesPerWord);
  const uint64_t slot = uint64_t{3} << shift;
  const uint64_t prepared = static_cast<uint64_t>(PageState::kPrepared) << shift;
  uint64_t old = word.load(std::memory_order_acquire);
  do {
    if ((old & slot) == prepared) return false;
  } while (!word.compare_exchange_weak(old, (old & ~slot) | prepared, std::memory_order_acq_rel,
                                       std::memory_order_acquire));
  return true;
}

uint64_t PageStateMap::MarkPunched(uint64_t first, uint64_t count) {
  assert(first <= page_count_ && count <= page_count_ - first);
  uint64_t released = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    const uint64_t old = Update(words_[w], mask, ToPunched);
    released += CountSlots(SlotsIn(old, PageState::kPrepared) & mask);
  });
  return released;
}

uint64_t PageStateMap::CountInState(uint64_t first, uint64_t count, PageState state) const {
  assert(first <= page_count_ && count <= page_count_ - first);
#if defined(GUESTMEM_POPCNT_AT_RUN_TIME)
  if (CpuHasPopcnt()) return CountRangeWithPopcnt(words_.get(), first, count, state);
#endif
  return CountRange<kTargetHasPopcnt>(words_.get(), first, count, state);
}

uint64_t PageStateMap::NextPrepared(uint64_t first, uint64_t end) const {
  assert(first <= end && end <= page_count_);
  return FindPrepared(words_.get(), first, end, /*want_prepared=*/true);
}

uint64_t PageStateMap::NextNotPrepared(uint64_t first, uint64_t end) const {
  assert(first <= end && end <= page_count_);
  return FindPrepared(words_.get(), first, end, /*want_prepared=*/false);
}

}  // namespace guestmem
