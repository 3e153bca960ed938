#include "guestmem/page_tracker.h"

#include <bit>
#include <cassert>

namespace guestmem {
namespace {

constexpr uint64_t kBitsPerWord = 64;

// Calls fn(word_index, mask) for each word that [first, first + count) touches, with the range's
// bits of that word in `mask`.
template <typename Fn>
void ForEachWord(uint64_t first, uint64_t count, Fn&& fn) {
  if (count == 0) return;
  const uint64_t last = first + count - 1;
  const uint64_t first_word = first / kBitsPerWord;
  const uint64_t last_word = last / kBitsPerWord;
  const uint64_t head = ~uint64_t{0} << (first % kBitsPerWord);
  const uint64_t tail = ~uint64_t{0} >> (kBitsPerWord - 1 - last % kBitsPerWord);
  if (first_word == last_word) {
    fn(first_word, head & tail);
    return;
  }
  fn(first_word, head);
  for (uint64_t w = first_word + 1; w < last_word; ++w) fn(w, ~uint64_t{0});
  fn(last_word, tail);
}

}  // namespace

PageTracker::PageTracker(uint64_t page_count)
    : page_count_(page_count),
      word_count_((page_count + kBitsPerWord - 1) / kBitsPerWord),
      words_(new std::atomic<uint64_t>[word_count_]) {
  for (uint64_t w = 0; w < word_count_; ++w) words_[w].store(0, std::memory_order_relaxed);
}

bool PageTracker::IsServed(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = words_[page / kBitsPerWord].load(std::memory_order_acquire);
  return ((word >> (page % kBitsPerWord)) & 1) != 0;
}

void PageTracker::MarkServed(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    if ((words_[w].load(std::memory_order_relaxed) & mask) != mask) {
      words_[w].fetch_or(mask, std::memory_order_release);
    }
  });
}

uint64_t PageTracker::Find(uint64_t first, uint64_t end, bool served) const {
  assert(first <= end && end <= page_count_);
  if (first >= end) return end;
  uint64_t w = first / kBitsPerWord;
  uint64_t mask = ~uint64_t{0} << (first % kBitsPerWord);
  const uint64_t last_word = (end - 1) / kBitsPerWord;
  while (true) {
    uint64_t word = words_[w].load(std::memory_order_acquire);
    if (!served) word = ~word;
    const uint64_t hits = word & mask;
    if (hits != 0) {
      const uint64_t page = w * kBitsPerWord + static_cast<uint64_t>(std::countr_zero(hits));
      return page < end ? page : end;
    }
    if (w == last_word) return end;
    ++w;
    mask = ~uint64_t{0};
  }
}

uint64_t PageTracker::NextPending(uint64_t first, uint64_t end) const {
  return Find(first, end, /*served=*/false);
}

uint64_t PageTracker::NextServed(uint64_t first, uint64_t end) const {
  return Find(first, end, /*served=*/true);
}

uint64_t PageTracker::CountServed(uint64_t first, uint64_t count) const {
  assert(first + count <= page_count_);
  uint64_t total = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    total += static_cast<uint64_t>(std::popcount(words_[w].load(std::memory_order_acquire) & mask));
  });
  return total;
}

void PageTracker::MarkServedFrom(const PageTracker& other) {
  assert(other.page_count_ == page_count_);
  for (uint64_t w = 0; w < word_count_; ++w) {
    const uint64_t served = other.words_[w].load(std::memory_order_acquire);
    if (served != 0) words_[w].fetch_or(served, std::memory_order_release);
  }
}

}  // namespace guestmem
