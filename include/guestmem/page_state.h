// PageStateMap: the state of every page of a guest memory file, two bits per page.
//
//   kAbsent    -> no backing allocated (never touched, or punched before it held content)
//   kAllocated -> backing allocated (fallocate) but no content written yet
//   kPrepared  -> content is in place (populated, copied or continued): safe to map
//   kRemoved   -> was prepared, then punched out; reads as zero until populated again
//
// Two bits per page packed into 64-bit atomic words (32 pages a word): a 64 GiB guest of 4 KiB
// pages needs 4 MiB. Range operations update whole words at once where the range covers them and
// count or search with bit-parallel word operations.
//
// Thread safety: every operation is lock-free and safe to call from many threads at once.
// Single-page transitions are atomic (compare-and-swap); range operations are atomic per page
// (each page goes from one valid state to the next), not across the range. Range queries read a
// consistent value per page, not a snapshot of the whole range.
//
// Memory ordering: every change of state is a release operation and every read (Get, the counts,
// the searches, and the read half of every update) is an acquire operation. So a thread that
// observes a page as kPrepared also observes every write another thread made before marking it
// prepared: write the content first, then MarkPrepared/TryMarkPrepared/Set, and a reader that
// sees kPrepared may map or read the content without further synchronisation.
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

// "absent", "allocated", "prepared" or "removed".
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

  // REQUIRES: page < page_count().
  PageState Get(uint64_t page) const;

  // For every operation and query below taking a range:
  // REQUIRES: first + count <= page_count() (count may be 0).

  // Sets every page in the range to `state` unconditionally.
  void Set(uint64_t first, uint64_t count, PageState state);

  // kAbsent/kRemoved -> kAllocated; kAllocated/kPrepared unchanged. Returns pages changed.
  uint64_t MarkAllocated(uint64_t first, uint64_t count);

  // Any state other than kPrepared -> kPrepared. Returns pages changed.
  uint64_t MarkPrepared(uint64_t first, uint64_t count);

  // Atomically moves one page to kPrepared if it is not kPrepared yet. Returns false if it
  // already was (somebody else prepared it first). Of many threads racing on the same page,
  // exactly one gets true.
  // REQUIRES: page < page_count().
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
  // REQUIRES: first <= end <= page_count().
  uint64_t NextPrepared(uint64_t first, uint64_t end) const;
  uint64_t NextNotPrepared(uint64_t first, uint64_t end) const;

 private:
  uint64_t page_count_;
  uint64_t word_count_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_STATE_H_
