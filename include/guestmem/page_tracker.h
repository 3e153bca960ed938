// PageTracker: which pages of a VM still need the snapshot's content.
//
// A fault handler keeps one tracker per VM, over the snapshot's file space in 4 KiB pages (a
// 2 MiB page is 512 entries). Every page starts *pending*: the first fault on it is given the
// snapshot's content. A page becomes *served* once that content was delivered, or once it stopped
// being wanted: the balloon removed it (UFFD_EVENT_REMOVE), the VM unmapped it, or it was
// poisoned. Served is final. A later MISSING fault on a served page means the kernel dropped the
// page (a MADV_DONTNEED whose zap landed after its REMOVE event was read, an unmap), and the page
// is then given zeros, exactly as the kernel gives zeros for anonymous memory the guest
// discarded: the snapshot's content is never served twice.
//
// This is the one fact the handler owns about a page. What is in a guest memory file (minor
// trap) is the MemoryFile's page state, a different fact kept there.
//
// One bit per page in 64-bit atomic words: 32 KiB for a 1 GiB guest. A tracker may keep its words
// in a memfd (CreateShared), so that its state outlives the process: a successor daemon that takes
// the VM over maps the same memfd (AttachShared) and knows every page that was served or removed.
//
// Thread safety: every method may be called from any thread. Marking is atomic per page with
// release order; queries use acquire order, so whoever sees a page served also sees what the
// marking thread wrote before marking it.
#ifndef GUESTMEM_PAGE_TRACKER_H_
#define GUESTMEM_PAGE_TRACKER_H_

#include <cstdint>
#include <memory>

#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

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

  bool IsServed(uint64_t page) const;
  void MarkServed(uint64_t first, uint64_t count);

  // The first page in [first, end) that is pending (or served), or `end` if there is none.
  uint64_t NextPending(uint64_t first, uint64_t end) const;
  uint64_t NextServed(uint64_t first, uint64_t end) const;
  uint64_t CountServed(uint64_t first, uint64_t count) const;

  // Takes every served page of `other` (same page_count()): a forked child starts with what its
  // parent had.
  void MarkServedFrom(const PageTracker& other);

 private:
  PageTracker(uint64_t page_count, uint64_t* words, UniqueFd memfd, Mapping mapping);
  uint64_t Find(uint64_t first, uint64_t end, bool served) const;

  uint64_t page_count_;
  uint64_t word_count_;
  std::unique_ptr<uint64_t[]> private_words_;  // when not shared
  UniqueFd memfd_;                             // when shared
  Mapping mapping_;                            // of memfd_
  uint64_t* words_;  // bit set = served; accessed only through std::atomic_ref
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_TRACKER_H_
