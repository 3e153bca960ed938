// GuestLayout: the memory regions of one VM and translation between its three address spaces.
//
// Each region says where it sits in guest physical memory, where the VMM maps it (host virtual
// address), where its content lives in the memory file (file offset), and its page size. A
// layout is validated once, when built: at least one region; page size 4 KiB or 2 MiB; sizes
// non-zero multiples of the page size; every start aligned to the page size; no overflow; no two
// regions overlapping in ANY of the three spaces. Gaps are allowed (x86's MMIO hole).
//
// Look-ups and translations are O(log n) binary searches over per-space sorted indexes.
//
// Thread safety: immutable after Create(); safe to share between threads.
#ifndef GUESTMEM_GUEST_LAYOUT_H_
#define GUESTMEM_GUEST_LAYOUT_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/result.h"

namespace guestmem {

struct GuestRegion {
  GuestPhysAddr guest_addr;
  uint64_t size = 0;
  FileOffset file_offset;
  HostVirtAddr host_addr;
  uint64_t page_size = kPageSize4K;
};

class GuestLayout {
 public:
  struct Hit {
    size_t region;  // index into regions()
    uint64_t offset_in_region;
  };

  // Regions may come in any order; they are kept sorted by guest address.
  static Result<GuestLayout> Create(std::vector<GuestRegion> regions);

  const std::vector<GuestRegion>& regions() const { return regions_; }
  uint64_t total_size() const { return total_size_; }
  uint64_t file_end() const { return file_end_; }  // max(file_offset + size)

  std::optional<Hit> FindGuest(GuestPhysAddr addr) const;
  std::optional<Hit> FindHost(HostVirtAddr addr) const;
  std::optional<Hit> FindFile(FileOffset offset) const;

  std::optional<HostVirtAddr> GuestToHost(GuestPhysAddr addr) const;
  std::optional<GuestPhysAddr> HostToGuest(HostVirtAddr addr) const;
  std::optional<FileOffset> HostToFile(HostVirtAddr addr) const;
  std::optional<HostVirtAddr> FileToHost(FileOffset offset) const;
  std::optional<FileOffset> GuestToFile(GuestPhysAddr addr) const;

 private:
  GuestLayout() = default;
  std::vector<GuestRegion> regions_;  // sorted by guest address
  std::vector<size_t> by_host_;       // region indexes sorted by host address
  std::vector<size_t> by_file_;       // region indexes sorted by file offset
  uint64_t total_size_ = 0;
  uint64_t file_end_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_GUEST_LAYOUT_H_
