// Arithmetic of 64-bit words that pack 32 two-bit slots, one per page: what PageStateMap (a
// memory file's page states) and PageTracker (a handler's page fates) are both made of.
//
// Slot s of a word is bits 2s (its low bit) and 2s + 1. A state or fate is the slot's value.
//
// Thread safety: pure functions.
#ifndef GUESTMEM_BASE_TWO_BIT_SLOTS_H_
#define GUESTMEM_BASE_TWO_BIT_SLOTS_H_

#include <cstdint>

namespace guestmem::slots {

inline constexpr uint64_t kPerWord = 32;
inline constexpr uint64_t kAll = ~uint64_t{0};
inline constexpr uint64_t kLowBits = 0x5555555555555555ULL;  // the low bit of every slot

// Every slot of a word set to `value` (0 to 3).
constexpr uint64_t Splat(uint64_t value) { return kLowBits * value; }

// The low bit of each slot of `word` that holds `value`, all other bits clear: the slots where
// word ^ Splat(value) has both bits clear. Branch-free, so loops need no switch.
constexpr uint64_t SlotsHolding(uint64_t word, uint64_t value) {
  const uint64_t diff = word ^ Splat(value);
  return ~(diff | (diff >> 1)) & kLowBits;
}

// Calls fn(word_index, mask) for each word that slots [first, first + count) touch, where `mask`
// covers the range's slots in that word. Whole words in the middle get exactly kAll, so `fn` can
// take a whole-word fast path on `mask == kAll`.
template <typename Fn>
void ForEachWord(uint64_t first, uint64_t count, Fn&& fn) {
  if (count == 0) return;
  const uint64_t last = first + count - 1;
  const uint64_t first_word = first / kPerWord;
  const uint64_t last_word = last / kPerWord;
  const uint64_t head = kAll << (2 * (first % kPerWord));
  const uint64_t tail = kAll >> (2 * (kPerWord - 1 - last % kPerWord));
  if (first_word == last_word) {
    fn(first_word, head & tail);
    return;
  }
  fn(first_word, head);
  for (uint64_t w = first_word + 1; w < last_word; ++w) fn(w, kAll);
  fn(last_word, tail);
}

}  // namespace guestmem::slots

#endif  // GUESTMEM_BASE_TWO_BIT_SLOTS_H_
