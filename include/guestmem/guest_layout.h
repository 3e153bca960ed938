// GuestLayout: the memory regions of one VM and translation between its three address spaces.
//
// Each region says where it sits in guest physical memory, where the VMM maps it (host virtual
// address), where its content lives in the memory file (file offset), and its page size. A
// layout is validated once, when built, and is immutable afterwards. Gaps between regions are
// allowed in every space (x86's MMIO hole below 4 GiB, a VMM's scattered host mappings).
//
// Look-ups and translations are O(log n) binary searches over one sorted index per space.
//
// Thread safety: immutable after Create(); const methods are safe to call from many threads.
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
  uint64_t size = 0;  // bytes
  FileOffset file_offset;
  HostVirtAddr host_addr;
  uint64_t page_size = kPageSize4K;  // kPageSize4K or kHugePageSize2M
};

class GuestLayout {
 public:
  // Where an address falls: the region (an index into regions()) and the offset into it.
  struct Hit {
    size_t region;
    uint64_t offset_in_region;
  };

  // Validates `regions` and builds the layout. Regions may come in any order; they are stored
  // sorted by guest address. Errors name the region by its index in `regions`:
  //   kInvalidArgument: no regions; a page size other than 4096 or 2097152; a size that is zero
  //     or not a multiple of the region's page size; a guest address, host address or file
  //     offset not aligned to the region's page size; two regions overlapping in guest addresses,
  //     host addresses or file offsets (touching is not overlapping).
  //   kOutOfRange: a region whose end (start + size) does not fit in 64 bits in any space, or
  //     whose file end is past the largest file offset (INT64_MAX).
  static Result<GuestLayout> Create(std::vector<GuestRegion> regions);

  // Sorted by guest address; never empty.
  const std::vector<GuestRegion>& regions() const { return regions_; }
  uint64_t total_size() const { return total_size_; }  // the sum of the regions' sizes
  uint64_t file_end() const { return file_end_; }      // max(file_offset + size)

  // The region holding the address, or std::nullopt if none does.
  std::optional<Hit> FindGuest(GuestPhysAddr addr) const;
  std::optional<Hit> FindHost(HostVirtAddr addr) const;
  std::optional<Hit> FindFile(FileOffset offset) const;

  // The same byte in another space, or std::nullopt if the address is in no region.
  std::optional<HostVirtAddr> GuestToHost(GuestPhysAddr addr) const;
  std::optional<GuestPhysAddr> HostToGuest(HostVirtAddr addr) const;
  std::optional<FileOffset> HostToFile(HostVirtAddr addr) const;
  std::optional<HostVirtAddr> FileToHost(FileOffset offset) const;
  std::optional<FileOffset> GuestToFile(GuestPhysAddr addr) const;

 private:
  GuestLayout() = default;

  std::vector<GuestRegion> regions_;  // sorted by guest address
  std::vector<size_t> by_host_;       // indexes into regions_, sorted by host address
  std::vector<size_t> by_file_;       // indexes into regions_, sorted by file offset
  uint64_t total_size_ = 0;
  uint64_t file_end_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_GUEST_LAYOUT_H_
