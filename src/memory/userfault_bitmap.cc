#include "guestmem/userfault_bitmap.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <atomic>
#include <bit>
#include <cassert>
#include <cerrno>
#include <string>

#include "guestmem/address.h"
#include "guestmem/os.h"

namespace guestmem {
namespace {

constexpr uint64_t kBitsPerWord = 64;
// Firecracker's regions are multiples of 1 MiB; a bitmap of whole bytes needs 8 pages a byte.
constexpr uint64_t kMemoryGranule = 8 * kPageSize4K;

std::atomic_ref<uint64_t> Word(uint64_t* words, uint64_t w) {
  return std::atomic_ref<uint64_t>(words[w]);
}

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

Result<std::unique_ptr<UserfaultBitmap>> UserfaultBitmap::Map(UniqueFd memfd, uint64_t memory_bytes,
                                                              Os* os) {
  if (os == nullptr) os = Os::Default();
  if (memory_bytes == 0 || memory_bytes % kMemoryGranule != 0) {
    return Error(ErrorCode::kInvalidArgument, "userfault bitmap: guest memory of " +
                                                  std::to_string(memory_bytes) +
                                                  " bytes is not a positive multiple of 32 KiB");
  }
  struct stat st {};
  if (fstat(memfd.get(), &st) != 0) return PosixError(errno, "userfault bitmap: fstat");
  const uint64_t pages = memory_bytes / kPageSize4K;
  const uint64_t needed = pages / 8;
  const auto size = static_cast<uint64_t>(st.st_size);
  // Words are read whole: the mapping covers whole pages, and the memfd at least the bits.
  if (size < needed || size > AlignUp(needed, kPageSize4K).value_or(0)) {
    return Error(ErrorCode::kInvalidArgument,
                 "userfault bitmap: the memfd holds " + std::to_string(size) + " bytes; " +
                     std::to_string(pages) + " pages need " + std::to_string(needed));
  }
  const uint64_t map_bytes = AlignUp(needed, kPageSize4K).value_or(0);
  GM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::Map(map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                    memfd.get(), 0, nullptr, os));
  return std::unique_ptr<UserfaultBitmap>(
      new UserfaultBitmap(std::move(memfd), std::move(mapping), pages));
}

bool UserfaultBitmap::IsSet(uint64_t page) const {
  assert(page < page_count_);
  const uint64_t word = Word(words(), page / kBitsPerWord).load(std::memory_order_acquire);
  return ((word >> (page % kBitsPerWord)) & 1) != 0;
}

void UserfaultBitmap::Clear(uint64_t first, uint64_t count) {
  assert(first + count <= page_count_);
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    std::atomic_ref<uint64_t> word = Word(words(), w);
    if ((word.load(std::memory_order_relaxed) & mask) != 0) {
      word.fetch_and(~mask, std::memory_order_release);
    }
  });
}

uint64_t UserfaultBitmap::CountSet(uint64_t first, uint64_t count) const {
  assert(first + count <= page_count_);
  uint64_t total = 0;
  ForEachWord(first, count, [&](uint64_t w, uint64_t mask) {
    total += static_cast<uint64_t>(
        std::popcount(Word(words(), w).load(std::memory_order_acquire) & mask));
  });
  return total;
}

}  // namespace guestmem
