// PageTracker: what a fault handler knows about each page of one VM.
//
// A handler keeps one tracker per VM, over the snapshot's file space in 4 KiB pages (a 2 MiB page
// is 512 entries, always set together). Each page has one fate:
//   kPending   the snapshot's content is still owed: the first fault on it gets that content;
//   kServed    mapped in the VM (by a fault, a fill or a prefetch). A later MISSING fault on it
//              means the kernel dropped it without telling (the zap of a REMOVE whose event was
//              read before the install landed): it is given zeros, as the kernel gives zeros for
//              anonymous memory the guest discarded — the snapshot's content is never served twice;
//   kPoisoned  the source could not supply it: the access gets SIGBUS. A second fault event on it
//              (queued before the poison) must never map anything there: it is poisoned again;
//   kRemoved   the balloon removed it (UFFD_EVENT_REMOVE) or the VM unmapped it: it reads zero,
//              and is known not to be mapped, so zeros may be installed there with its neighbours.
// Every page starts kPending; REMOVE and UNMAP make any page kRemoved; installs make kServed.
//
// This is the one fact the handler owns about a page. What is in a guest memory file (minor
// trap) is the MemoryFile's page state, a different fact kept there.
//
// Two bits per page in 64-bit words: 64 KiB for a 1 GiB guest. A tracker may keep its words in a
// memfd (CreateShared), so that its state outlives the process: a successor daemon that takes the
// VM over maps the same memfd (AttachShared) and knows every page's fate.
//
// Thread safety: every method may be called from any thread. Each page's change is atomic with
// release order; queries use acquire order, so whoever sees a page's fate also sees what the
// thread that set it wrote before.
#ifndef GUESTMEM_PAGE_TRACKER_H_
#define GUESTMEM_PAGE_TRACKER_H_

#include <cstdint>
#include <memory>
#include <string_view>

#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

enum class PageFate : uint8_t {
  kPending = 0,
  kServed = 1,
  kPoisoned = 2,
  kRemoved = 3,
};

// "pending", "served", "poisoned", "removed".
std::string_view PageFateName(PageFate fate);

class PageTracker {
 public:
  // Every page starts pending; the words live in this process's memory.
  explicit PageTracker(uint64_t page_count);
  // Every page starts pending; the words live in a new memfd (shared_fd()).
  // ERRORS: what memfd_create, ftruncate and mmap report.
  static Result<std::unique_ptr<PageTracker>> CreateShared(uint64_t page_count, Os* os = nullptr);
  // Maps a memfd that CreateShared made (in this process or another), with its state.
  // ERRORS: kInvalidArgument when the memfd's size does not fit `page_count`.
  static Result<std::unique_ptr<PageTracker>> AttachShared(UniqueFd memfd, uint64_t page_count,
                                                           Os* os = nullptr);
  PageTracker(const PageTracker&) = delete;
  PageTracker& operator=(const PageTracker&) = delete;
  ~PageTracker();

  uint64_t page_count() const { return page_count_; }
  // The memfd holding the words; -1 for a tracker in private memory.
  int shared_fd() const { return memfd_.get(); }
  // Bytes of state: what a memfd for `page_count` pages holds.
  static uint64_t StateBytes(uint64_t page_count);

  // For every method taking a page or a range:
  // REQUIRES: page < page_count(); first <= end <= page_count(); first + count <= page_count().

  PageFate Fate(uint64_t page) const;
  void Set(uint64_t first, uint64_t count, PageFate fate);

  // The first page in [first, end) that is pending, or `end` if there is none.
  uint64_t NextPending(uint64_t first, uint64_t end) const;
  uint64_t CountIn(uint64_t first, uint64_t count, PageFate fate) const;

  // Takes every page's fate from `other` (same page_count()): a forked child starts with what
  // its parent had, poison included.
  void CopyFrom(const PageTracker& other);

 private:
  PageTracker(uint64_t page_count, uint64_t* words, UniqueFd memfd, Mapping mapping);

  uint64_t page_count_;
  uint64_t word_count_;
  std::unique_ptr<uint64_t[]> private_words_;  // when not shared
  UniqueFd memfd_;                             // when shared
  Mapping mapping_;                            // of memfd_
  uint64_t* words_;  // 32 pages a word, 2 bits each; accessed only through std::atomic_ref
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_TRACKER_H_
