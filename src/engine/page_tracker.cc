#include "guestmem/page_tracker.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <string>

#include "guestmem/address.h"
#include "guestmem/os.h"

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

uint64_t WordCount(uint64_t page_count) { return (page_count + kBitsPerWord - 1) / kBitsPerWord; }

std::atomic_ref<uint64_t> Word(uint64_t* words, uint64_t w) {
  return std::atomic_ref<uint64_t>(words[w]);
}

}  // namespace

static_assert(std::atomic_ref<uint64_t>::is_always_lock_free,
              "the tracker's words are shared between processes: they must be lock-free");

PageTracker::PageTracker(uint64_t page_count)
    : page_count_(page_count),
      word_count_(WordCount(page_count)),
      private_words_(new uint64_t[std::max<uint64_t>(word_count_, 1)]()),
      words_(private_words_.get()) {}

PageTracker::PageTracker(uint64_t page_count, uint64_t* words, UniqueFd memfd, Mapping mapping)
    : page_count_(page_count),
      word_count_(WordCount(page_count)),
      memfd_(std::move(memfd)),
      mapping_(std::move(mapping)),
      words_(words) {}

PageTracker::~PageTracker() = default;

uint64_t PageTracker::StateBytes(uint64_t page_count) {
  // Whole pages, never zero, so that the memfd can be mapped.
  return AlignUp(std::max<uint64_t>(WordCount(page_count) * sizeof(uint64_t), 1), kPageSize4K)
      .value_or(0);
}

Result<std::unique_ptr<PageTracker>> PageTracker::CreateShared(uint64_t page_count, Os* os) {
  if (os == nullptr) os = Os::Default();
  const int fd = os->MemfdCreate("guestmem-page-tracker", MFD_CLOEXEC);
  if (fd < 0) return PosixError(-fd, "page tracker: memfd_create");
  UniqueFd memfd(fd);
  const uint64_t bytes = StateBytes(page_count);
  if (const int rc = os->Ftruncate(memfd.get(), static_cast<off_t>(bytes)); rc < 0) {
    return PosixError(-rc, "page tracker: ftruncate to " + std::to_string(bytes) + " bytes");
  }
  return AttachShared(std::move(memfd), page_count, os);
}

Result<std::unique_ptr<PageTracker>> PageTracker::AttachShared(UniqueFd memfd, uint64_t page_count,
                                                               Os* os) {
  if (os == nullptr) os = Os::Default();
  const uint64_t bytes = StateBytes(page_count);
  const off_t end = os->Lseek(memfd.get(), 0, SEEK_END);
  if (end < 0) return PosixError(static_cast<int>(-end), "page tracker: size of its memfd");
  if (static_cast<uint64_t>(end) != bytes) {
    return Error(ErrorCode::kInvalidArgument,
                 "page tracker: its memfd holds " + std::to_string(end) + " bytes, " +
                     std::to_string(page_count) + " pages need " + std::to_string(bytes));
  }
  GM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                    memfd.get(), 0, nullptr, os));
  auto* words = static_cast<uint64_t*>(mapping.data());
  return std::unique_ptr<PageTracker>(
      new PageTracker(page_count, words, std::move(memfd), std::move(mapping)));
}

bool PageTracker::IsServed(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = Word(words_, page / kBitsPerWord).load(std::memory_order_acquire);
  return ((word >> (page % kBitsPerWord)) & 1) != 0;
}

void PageTracker::MarkServed(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    std::atomic_ref<uint64_t> word = Word(words_, w);
    if ((word.load(std::memory_order_relaxed) & mask) != mask) {
      word.fetch_or(mask, std::memory_order_release);
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
    uint64_t word = Word(words_, w).load(std::memory_order_acquire);
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
    total += static_cast<uint64_t>(
        std::popcount(Word(words_, w).load(std::memory_order_acquire) & mask));
  });
  return total;
}

void PageTracker::MarkServedFrom(const PageTracker& other) {
  assert(other.page_count_ == page_count_);
  for (uint64_t w = 0; w < word_count_; ++w) {
    const uint64_t served = Word(other.words_, w).load(std::memory_order_acquire);
    if (served != 0) Word(words_, w).fetch_or(served, std::memory_order_release);
  }
}

}  // namespace guestmem
