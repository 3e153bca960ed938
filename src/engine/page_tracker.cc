#include "guestmem/page_tracker.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <string>

#include "base/two_bit_slots.h"
#include "guestmem/address.h"
#include "guestmem/os.h"

namespace guestmem {
namespace {

// Page p lives in word p / 32, in slot p % 32 (two_bit_slots.h), as its PageFate.
constexpr uint64_t kPagesPerWord = slots::kPerWord;

constexpr uint64_t Splat(PageFate fate) { return slots::Splat(static_cast<uint64_t>(fate)); }
constexpr uint64_t SlotsIn(uint64_t word, PageFate fate) {
  return slots::SlotsHolding(word, static_cast<uint64_t>(fate));
}
using slots::ForEachWord;

uint64_t WordCount(uint64_t page_count) { return (page_count + kPagesPerWord - 1) / kPagesPerWord; }

std::atomic_ref<uint64_t> Word(uint64_t* words, uint64_t w) {
  return std::atomic_ref<uint64_t>(words[w]);
}

}  // namespace

static_assert(std::atomic_ref<uint64_t>::is_always_lock_free,
              "the tracker's words are shared between processes: they must be lock-free");

std::string_view PageFateName(PageFate fate) {
  switch (fate) {
    case PageFate::kPending:
      return "pending";
    case PageFate::kServed:
      return "served";
    case PageFate::kPoisoned:
      return "poisoned";
    case PageFate::kRemoved:
      return "removed";
  }
  return "?";
}

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

PageFate PageTracker::Fate(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = Word(words_, page / kPagesPerWord).load(std::memory_order_acquire);
  return static_cast<PageFate>((word >> (2 * (page % kPagesPerWord))) & 3);
}

void PageTracker::Set(uint64_t first, uint64_t count, PageFate fate) {
  assert(first + count <= page_count_);
  const uint64_t splat = Splat(fate);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    std::atomic_ref<uint64_t> word = Word(words_, w);
    uint64_t old = word.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t updated = (old & ~mask) | (splat & mask);
      if (updated == old) return;
      if (word.compare_exchange_weak(old, updated, std::memory_order_release,
                                     std::memory_order_relaxed)) {
        return;
      }
    }
  });
}

uint64_t PageTracker::NextPending(uint64_t first, uint64_t end) const {
  assert(first <= end && end <= page_count_);
  if (first >= end) return end;
  uint64_t w = first / kPagesPerWord;
  uint64_t mask = ~uint64_t{0} << (2 * (first % kPagesPerWord));
  const uint64_t last_word = (end - 1) / kPagesPerWord;
  while (true) {
    const uint64_t word = Word(words_, w).load(std::memory_order_acquire);
    const uint64_t hits = SlotsIn(word, PageFate::kPending) & mask;
    if (hits != 0) {
      const uint64_t page = w * kPagesPerWord + static_cast<uint64_t>(std::countr_zero(hits)) / 2;
      return std::min(page, end);
    }
    if (w == last_word) return end;
    ++w;
    mask = ~uint64_t{0};
  }
}

uint64_t PageTracker::CountIn(uint64_t first, uint64_t count, PageFate fate) const {
  assert(first + count <= page_count_);
  uint64_t total = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    const uint64_t word = Word(words_, w).load(std::memory_order_acquire);
    total += static_cast<uint64_t>(std::popcount(SlotsIn(word, fate) & mask));
  });
  return total;
}

void PageTracker::CopyFrom(const PageTracker& other) {
  assert(other.page_count_ == page_count_);
  for (uint64_t w = 0; w < word_count_; ++w) {
    Word(words_, w).store(Word(other.words_, w).load(std::memory_order_acquire),
                          std::memory_order_release);
  }
}

}  // namespace guestmem
