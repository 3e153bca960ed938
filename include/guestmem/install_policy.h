// Install policy: what the fault pipeline installs next, and with which content.
//
//   FaultAroundPolicy  the window installed with a faulting page: an aligned window of a fixed
//                      size around it, never crossing its region's edges; a 2 MiB page alone;
//   AdaptiveWindowPolicy  windows that follow the guest: a fault where a stream's last window
//                      ended grows that stream's window (doubling, up to a bound); a fault in a
//                      block where faults have already been served brings the whole block; any
//                      other fault brings its page alone;
//   FillCursor         a background fill (fault-all): every region walked once, in order, in
//                      chunks that still hold pending pages, so that a fill yields to faults and
//                      to other VMs between chunks;
//   PlanWindow         splits a range into pieces to install: pending pages, with their kind
//                      from the source's extents, and the faulting page itself.
//
// Thread safety: FaultAroundPolicy and PlanWindow hold no mutable state; an AdaptiveWindowPolicy
// and a FillCursor are used by one thread at a time.
#ifndef GUESTMEM_INSTALL_POLICY_H_
#define GUESTMEM_INSTALL_POLICY_H_

#include <cstddef>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "guestmem/guest_layout.h"
#include "guestmem/page_installer.h"
#include "guestmem/page_source.h"
#include "guestmem/page_state.h"
#include "guestmem/page_tracker.h"

namespace guestmem {

// A range of one region (offsets within the region), [begin, end).
struct RegionRange {
  size_t region = 0;
  uint64_t begin = 0;
  uint64_t end = 0;
};

class FaultAroundPolicy {
 public:
  // REQUIRES: window_bytes a power of two >= 4 KiB.
  explicit FaultAroundPolicy(uint64_t window_bytes) : window_(window_bytes) {}
  uint64_t window_bytes() const { return window_; }
  // The range to install for a fault on the page at `page_offset` of `region` (an index into
  // layout.regions()).
  RegionRange WindowFor(const GuestLayout& layout, size_t region, uint64_t page_offset) const;

 private:
  uint64_t window_;
};

class AdaptiveWindowPolicy {
 public:
  // A sequential stream's window grows to at most max_stream_bytes; a fault in a block of
  // block_bytes that holds at least kDenseAfter pages served already brings that whole block.
  // REQUIRES: both powers of two >= 4 KiB.
  AdaptiveWindowPolicy(uint64_t block_bytes, uint64_t max_stream_bytes)
      : block_(block_bytes), max_stream_(max_stream_bytes) {}

  static constexpr uint64_t kDenseAfter = 1;
  // Streams followed at once (one per guest thread scanning, say); the least recent is replaced.
  static constexpr size_t kStreams = 8;

  // The range to install for a fault on the page at `page_offset` of `region`; `tracker` says
  // which pages are served already.
  RegionRange WindowFor(const GuestLayout& layout, size_t region, uint64_t page_offset,
                        const PageTracker& tracker);

 private:
  struct Stream {
    size_t region = SIZE_MAX;
    uint64_t last_begin = 0;  // the stream's last window
    uint64_t last_end = 0;    // where its next fault would come
    uint64_t last_used = 0;
  };
  uint64_t block_;
  uint64_t max_stream_;
  std::array<Stream, kStreams> streams_{};
  uint64_t clock_ = 0;
};

class FillCursor {
 public:
  // The next chunk of at most `max_bytes` (rounded down to the region's page size, at least one
  // page) from the cursor on, starting at the first page still pending; std::nullopt once every
  // region has been walked. Does not move the cursor: Advance() does, once the chunk is in.
  std::optional<RegionRange> Next(const GuestLayout& layout, const PageTracker& tracker,
                                  uint64_t max_bytes);
  // Moves the cursor to the end of `chunk` (one Next() returned).
  void Advance(const RegionRange& chunk);

 private:
  size_t region_ = 0;
  uint64_t offset_ = 0;
};

// One install: [offset, offset + length) of a region, all of one content kind.
struct InstallPiece {
  uint64_t offset = 0;
  uint64_t length = 0;
  ContentKind kind = ContentKind::kData;
};

// Appends to *out the pieces that install `range` of its region: every pending page, as data or
// zeros as the source's extents say (a huge page is data if any part of it is; a page whose
// extent cannot be found is data, so that its read reports the error); every removed page, as
// zeros; and the page at `fault_page` (an offset within the region) if it is served: with zeros,
// since its snapshot content was delivered once already. Other served pages and poisoned pages
// are left out. Neighbouring pages of one kind make one piece. `write_fault` makes zeros
// kZeroToWrite. In the minor trap, `file_pages` (the guest memory file's page states, in the
// region's page size) makes the pages the file holds already kInFile: they are mapped, not read.
void PlanWindow(const GuestLayout& layout, const RegionRange& range,
                std::optional<uint64_t> fault_page, bool write_fault, const PageTracker& tracker,
                const PageSource& source, std::vector<InstallPiece>* out,
                const PageStateMap* file_pages = nullptr);

}  // namespace guestmem

#endif  // GUESTMEM_INSTALL_POLICY_H_
