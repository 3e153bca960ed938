#include "guestmem/guest_layout.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>

namespace guestmem {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// The three spaces, each as "start of region i" for sorting and overlap checks.
enum class Space { kGuest, kHost, kFile };
const char* SpaceName(Space s) {
  switch (s) {
    case Space::kGuest: return "guest physical addresses";
    case Space::kHost: return "host virtual addresses";
    case Space::kFile: return "file offsets";
  }
  return "";
}
uint64_t StartIn(const GuestRegion& r, Space s) {
  switch (s) {
    case Space::kGuest: return r.guest_addr.value();
    case Space::kHost: return r.host_addr.value();
    case Space::kFile: return r.file_offset.value();
  }
  return 0;
}

Status CheckRegion(const GuestRegion& r, size_t i) {
  const std::string where = "region " + std::to_string(i) + ": ";
  if (r.page_size != kPageSize4K && r.page_size != kHugePageSize2M) {
    return Error(ErrorCode::kInvalidArgument,
                 where + "page size " + std::to_string(r.page_size) + " is neither 4096 nor 2097152");
  }
  if (r.size == 0) return Error(ErrorCode::kInvalidArgument, where + "size is zero");
  if (!IsAligned(r.size, r.page_size)) {
    return Error(ErrorCode::kInvalidArgument, where + "size " + Hex(r.size) +
                                                  " is not a multiple of its page size " +
                                                  std::to_string(r.page_size));
  }
  for (Space s : {Space::kGuest, Space::kHost, Space::kFile}) {
    const uint64_t start = StartIn(r, s);
    if (!IsAligned(start, r.page_size)) {
      return Error(ErrorCode::kInvalidArgument,
                   where + "start " + Hex(start) + " in " + SpaceName(s) +
                       " is not aligned to its page size " + std::to_string(r.page_size));
    }
    if (!CheckedAdd(start, r.size)) {
      return Error(ErrorCode::kOutOfRange, where + "start " + Hex(start) + " + size " +
                                               Hex(r.size) + " overflows in " + SpaceName(s));
    }
  }
  return OkStatus();
}

// Region indexes sorted by their start in `space`; an error if two overlap there.
Result<std::vector<size_t>> SortedWithoutOverlap(const std::vector<GuestRegion>& regions,
                                                 Space space) {
  std::vector<size_t> order(regions.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return StartIn(regions[a], space) < StartIn(regions[b], space);
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const GuestRegion& prev = regions[order[k - 1]];
    const GuestRegion& next = regions[order[k]];
    if (StartIn(prev, space) + prev.size > StartIn(next, space)) {
      return Error(ErrorCode::kInvalidArgument,
                   "regions " + std::to_string(order[k - 1]) + " and " + std::to_string(order[k]) +
                       " overlap in " + SpaceName(space) + " at [" + Hex(StartIn(next, space)) +
                       ", " + Hex(std::min(StartIn(prev, space) + prev.size,
                                           StartIn(next, space) + next.size)) +
                       ")");
    }
  }
  return order;
}

// Binary search over `order` (sorted by start in `space`) for the region containing `value`.
std::optional<GuestLayout::Hit> Find(const std::vector<GuestRegion>& regions,
                                     const std::vector<size_t>& order, Space space,
                                     uint64_t value) {
  auto it = std::upper_bound(order.begin(), order.end(), value, [&](uint64_t v, size_t idx) {
    return v < StartIn(regions[idx], space);
  });
  if (it == order.begin()) return std::nullopt;
  const size_t idx = *(it - 1);
  const uint64_t start = StartIn(regions[idx], space);
  if (value - start >= regions[idx].size) return std::nullopt;
  return GuestLayout::Hit{idx, value - start};
}

}  // namespace

Result<GuestLayout> GuestLayout::Create(std::vector<GuestRegion> regions) {
  if (regions.empty()) return Error(ErrorCode::kInvalidArgument, "guest layout: no regions");
  for (size_t i = 0; i < regions.size(); ++i) GM_RETURN_IF_ERROR(CheckRegion(regions[i], i));
  GM_ASSIGN_OR_RETURN(std::vector<size_t> by_guest, SortedWithoutOverlap(regions, Space::kGuest));
  GM_RETURN_IF_ERROR(SortedWithoutOverlap(regions, Space::kHost));
  GM_RETURN_IF_ERROR(SortedWithoutOverlap(regions, Space::kFile));

  GuestLayout layout;
  for (size_t idx : by_guest) layout.regions_.push_back(regions[idx]);
  GM_ASSIGN_OR_RETURN(layout.by_host_, SortedWithoutOverlap(layout.regions_, Space::kHost));
  GM_ASSIGN_OR_RETURN(layout.by_file_, SortedWithoutOverlap(layout.regions_, Space::kFile));
  for (const GuestRegion& r : layout.regions_) {
    layout.total_size_ += r.size;
    layout.file_end_ = std::max(layout.file_end_, r.file_offset.value() + r.size);
  }
  return layout;
}

std::optional<GuestLayout::Hit> GuestLayout::FindGuest(GuestPhysAddr addr) const {
  // regions_ itself is sorted by guest address.
  auto it = std::upper_bound(regions_.begin(), regions_.end(), addr.value(),
                             [](uint64_t v, const GuestRegion& r) { return v < r.guest_addr.value(); });
  if (it == regions_.begin()) return std::nullopt;
  const size_t idx = static_cast<size_t>(it - regions_.begin()) - 1;
  const uint64_t offset = addr.value() - regions_[idx].guest_addr.value();
  if (offset >= regions_[idx].size) return std::nullopt;
  return Hit{idx, offset};
}

std::optional<GuestLayout::Hit> GuestLayout::FindHost(HostVirtAddr addr) const {
  return Find(regions_, by_host_, Space::kHost, addr.value());
}

std::optional<GuestLayout::Hit> GuestLayout::FindFile(FileOffset offset) const {
  return Find(regions_, by_file_, Space::kFile, offset.value());
}

std::optional<HostVirtAddr> GuestLayout::GuestToHost(GuestPhysAddr addr) const {
  auto hit = FindGuest(addr);
  if (!hit) return std::nullopt;
  return regions_[hit->region].host_addr.UncheckedAdd(hit->offset_in_region);
}

std::optional<GuestPhysAddr> GuestLayout::HostToGuest(HostVirtAddr addr) const {
  auto hit = FindHost(addr);
  if (!hit) return std::nullopt;
  return regions_[hit->region].guest_addr.UncheckedAdd(hit->offset_in_region);
}

std::optional<FileOffset> GuestLayout::HostToFile(HostVirtAddr addr) const {
  auto hit = FindHost(addr);
  if (!hit) return std::nullopt;
  return regions_[hit->region].file_offset.UncheckedAdd(hit->offset_in_region);
}

std::optional<HostVirtAddr> GuestLayout::FileToHost(FileOffset offset) const {
  auto hit = FindFile(offset);
  if (!hit) return std::nullopt;
  return regions_[hit->region].host_addr.UncheckedAdd(hit->offset_in_region);
}

std::optional<FileOffset> GuestLayout::GuestToFile(GuestPhysAddr addr) const {
  auto hit = FindGuest(addr);
  if (!hit) return std::nullopt;
  return regions_[hit->region].file_offset.UncheckedAdd(hit->offset_in_region);
}

}  // namespace guestmem
