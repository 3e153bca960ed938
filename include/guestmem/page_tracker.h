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
// One bit per page in 64-bit atomic words: 32 KiB for a 1 GiB guest.
//
// Thread safety: every method may be called from any thread. Marking is atomic per page with
// release order; queries use acquire order, so whoever sees a page served also sees what the
// marking thread wrote before marking it.
#ifndef GUESTMEM_PAGE_TRACKER_H_
#define GUESTMEM_PAGE_TRACKER_H_

#include <atomic>
#include <cstdint>
#include <memory>

namespace guestmem {

class PageTracker {
 public:
  // Every page starts pending.
  explicit PageTracker(uint64_t page_count);
  PageTracker(const PageTracker&) = delete;
  PageTracker& operator=(const PageTracker&) = delete;

  uint64_t page_count() const { return page_count_; }

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
  uint64_t Find(uint64_t first, uint64_t end, bool served) const;

  uint64_t page_count_;
  uint64_t word_count_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;  // bit set = served
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_TRACKER_H_
