// PageStateMap: the state of every page of a guest memory file, two bits per page.
//
//   kAbsent    -> no backing allocated (never touched, or punched before it held content)
//   kAllocated -> backing allocated (fallocate) but no content written yet
//   kPrepared  -> content is in place (populated, copied or continued): safe to map
//   kRemoved   -> was prepared, then punched out; reads as zero until populated again
//
// Two bits per page packed into 64-bit atomic words (32 pages a word): a 64 GiB guest of 4 KiB
// pages needs 4 MiB. Every operation is lock-free and safe to call from many threads at once;
// single-page transitions are atomic (compare-and-swap), and range operations are atomic per
// page (not across the range). Range queries read a consistent value per page.
//
// Pages are numbered from 0; ranges are [first, first + count). Ranges outside the map are a
// programming error (checked by assert); callers validate user input before calling in.
#ifndef GUESTMEM_PAGE_STATE_H_
#define GUESTMEM_PAGE_STATE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

namespace guestmem {

enum class PageState : uint8_t {
  kAbsent = 0,
  kAllocated = 1,
  kPrepared = 2,
  kRemoved = 3,
};

std::string_view PageStateName(PageState state);

class PageStateMap {
 public:
  // All pages start kAbsent.
  explicit PageStateMap(uint64_t page_count);
  PageStateMap(const PageStateMap&) = delete;
  PageStateMap& operator=(const PageStateMap&) = delete;

  uint64_t page_count() const { return page_count_; }
  // Bytes of state held (for reports and the memory-overhead test).
  size_t memory_bytes() const { return word_count_ * sizeof(uint64_t); }

  PageState Get(uint64_t page) const;

  // Sets every page in the range to `state` unconditionally.
  void Set(uint64_t first, uint64_t count, PageState state);

  // kAbsent/kRemoved -> kAllocated; kAllocated/kPrepared unchanged. Returns pages changed.
  uint64_t MarkAllocated(uint64_t first, uint64_t count);

  // Any state other than kPrepared -> kPrepared. Returns pages changed.
  uint64_t MarkPrepared(uint64_t first, uint64_t count);

  // Atomically moves one page to kPrepared if it is not kPrepared yet. Returns false if it
  // already was (somebody else prepared it first).
  bool TryMarkPrepared(uint64_t page);

  // Punch: kPrepared -> kRemoved, kAllocated -> kAbsent; kAbsent/kRemoved unchanged.
  // Returns the number of pages that were kPrepared (content released).
  uint64_t MarkPunched(uint64_t first, uint64_t count);

  uint64_t CountInState(uint64_t first, uint64_t count, PageState state) const;
  uint64_t CountPrepared(uint64_t first, uint64_t count) const {
    return CountInState(first, count, PageState::kPrepared);
  }
  bool AllPrepared(uint64_t first, uint64_t count) const {
    return CountPrepared(first, count) == count;
  }

  // The first page in [first, end) that is (or is not) kPrepared, or `end` if none.
  uint64_t NextPrepared(uint64_t first, uint64_t end) const;
  uint64_t NextNotPrepared(uint64_t first, uint64_t end) const;

 private:
  uint64_t page_count_;
  uint64_t word_count_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_STATE_H_
