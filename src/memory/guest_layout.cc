#include "guestmem/guest_layout.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <numeric>
#include <string>

#include "base/hex.h"

namespace guestmem {
namespace {

// The largest file offset (off_t is signed).
constexpr uint64_t kMaxFileOffset = INT64_MAX;

enum class Space { kGuest, kHost, kFile };
constexpr Space kSpaces[] = {Space::kGuest, Space::kHost, Space::kFile};

// "guest address", "host address", "file offset"; in the plural when `plural`.
std::string SpaceName(Space space, bool plural) {
  std::string name;
  switch (space) {
    case Space::kGuest:
      name = "guest address";
      break;
    case Space::kHost:
      name = "host address";
      break;
    case Space::kFile:
      name = "file offset";
      break;
  }
  return plural ? name + (space == Space::kFile ? "s" : "es") : name;
}

uint64_t StartIn(const GuestRegion& region, Space space) {
  switch (space) {
    case Space::kGuest:
      return region.guest_addr.value();
    case Space::kHost:
      return region.host_addr.value();
    case Space::kFile:
      return region.file_offset.value();
  }
  return 0;
}

Error RegionError(ErrorCode code, size_t index, const std::string& what) {
  return Error(code, "guest layout: region " + std::to_string(index) + ": " + what);
}

Status CheckRegion(const GuestRegion& region, size_t index) {
  const uint64_t page_size = region.page_size;
  if (page_size != kPageSize4K && page_size != kHugePageSize2M) {
    return RegionError(ErrorCode::kInvalidArgument, index,
                       "page size " + std::to_string(page_size) + " is neither " +
                           std::to_string(kPageSize4K) + " nor " + std::to_string(kHugePageSize2M));
  }
  if (region.size == 0) return RegionError(ErrorCode::kInvalidArgument, index, "size is zero");
  if (!IsAligned(region.size, page_size)) {
    return RegionError(ErrorCode::kInvalidArgument, index,
                       "size " + Hex(region.size) + " is not a multiple of its page size " +
                           std::to_string(page_size));
  }
  for (Space space : kSpaces) {
    const uint64_t start = StartIn(region, space);
    if (!IsAligned(start, page_size)) {
      return RegionError(ErrorCode::kInvalidArgument, index,
                         SpaceName(space, false) + " " + Hex(start) +
                             " is not aligned to its page size " + std::to_string(page_size));
    }
    const std::optional<uint64_t> end = CheckedAdd(start, region.size);
    if (!end || (space == Space::kFile && *end > kMaxFileOffset)) {
      return RegionError(ErrorCode::kOutOfRange, index,
                         SpaceName(space, false) + " " + Hex(start) + " + size " +
                             Hex(region.size) + " overflows" +
                             (end ? " the largest file offset " + Hex(kMaxFileOffset) : ""));
    }
  }
  return OkStatus();
}

// The indexes of `regions` sorted by their start in `space`, or an error naming two regions
// that overlap there. REQUIRES: every region passed CheckRegion (so no end overflows).
Result<std::vector<size_t>> SortWithoutOverlap(const std::vector<GuestRegion>& regions,
                                               Space space) {
  std::vector<size_t> order(regions.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return StartIn(regions[a], space) < StartIn(regions[b], space);
  });
  // Sorted by start, two regions overlap only if some neighbours do.
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t a = order[k - 1];
    const size_t b = order[k];
    const uint64_t a_end = StartIn(regions[a], space) + regions[a].size;
    const uint64_t b_start = StartIn(regions[b], space);
    if (a_end > b_start) {
      const uint64_t overlap_end = std::min(a_end, b_start + regions[b].size);
      return Error(ErrorCode::kInvalidArgument,
                   "guest layout: regions " + std::to_string(std::min(a, b)) + " and " +
                       std::to_string(std::max(a, b)) + " overlap in " + SpaceName(space, true) +
                       " [" + Hex(b_start) + ", " + Hex(overlap_end) + ")");
    }
  }
  return order;
}

// The region holding `value` in `space`, where index_of(k) is the index of the k-th region in
// the order of their starts in that space.
template <typename IndexOf>
std::optional<GuestLayout::Hit> Find(const std::vector<GuestRegion>& regions, Space space,
                                     uint64_t value, IndexOf index_of) {
  // The number of regions starting at or before `value`.
  size_t lo = 0;
  size_t hi = regions.size();
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    if (StartIn(regions[index_of(mid)], space) <= value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo == 0) return std::nullopt;
  const size_t index = index_of(lo - 1);
  const uint64_t offset = value - StartIn(regions[index], space);
  if (offset >= regions[index].size) return std::nullopt;
  return GuestLayout::Hit{index, offset};
}

// The address of `hit` in the space `To` names.
template <typename To>
std::optional<To> Translate(const std::vector<GuestRegion>& regions,
                            std::optional<GuestLayout::Hit> hit, Space to) {
  if (!hit) return std::nullopt;
  return To(StartIn(regions[hit->region], to) + hit->offset_in_region);
}

}  // namespace

Result<GuestLayout> GuestLayout::Create(std::vector<GuestRegion> regions) {
  if (regions.empty()) return Error(ErrorCode::kInvalidArgument, "guest layout: no regions");
  for (size_t i = 0; i < regions.size(); ++i) GM_RETURN_IF_ERROR(CheckRegion(regions[i], i));
  GM_ASSIGN_OR_RETURN(const std::vector<size_t> by_guest,
                      SortWithoutOverlap(regions, Space::kGuest));
  GM_ASSIGN_OR_RETURN(std::vector<size_t> by_host, SortWithoutOverlap(regions, Space::kHost));
  GM_ASSIGN_OR_RETURN(std::vector<size_t> by_file, SortWithoutOverlap(regions, Space::kFile));

  // Store the regions in guest order and renumber the other orders to match.
  std::vector<size_t> rank(regions.size());
  for (size_t k = 0; k < by_guest.size(); ++k) rank[by_guest[k]] = k;
  for (size_t& index : by_host) index = rank[index];
  for (size_t& index : by_file) index = rank[index];

  GuestLayout layout;
  layout.regions_.reserve(regions.size());
  for (size_t index : by_guest) {
    const GuestRegion& region = regions[index];
    layout.regions_.push_back(region);
    layout.total_size_ += region.size;
    layout.file_end_ = std::max(layout.file_end_, region.file_offset.value() + region.size);
  }
  layout.by_host_ = std::move(by_host);
  layout.by_file_ = std::move(by_file);
  return layout;
}

std::optional<GuestLayout::Hit> GuestLayout::FindGuest(GuestPhysAddr addr) const {
  return Find(regions_, Space::kGuest, addr.value(), [](size_t k) { return k; });
}

std::optional<GuestLayout::Hit> GuestLayout::FindHost(HostVirtAddr addr) const {
  return Find(regions_, Space::kHost, addr.value(), [this](size_t k) { return by_host_[k]; });
}

std::optional<GuestLayout::Hit> GuestLayout::FindFile(FileOffset offset) const {
  return Find(regions_, Space::kFile, offset.value(), [this](size_t k) { return by_file_[k]; });
}

std::optional<HostVirtAddr> GuestLayout::GuestToHost(GuestPhysAddr addr) const {
  return Translate<HostVirtAddr>(regions_, FindGuest(addr), Space::kHost);
}

std::optional<GuestPhysAddr> GuestLayout::HostToGuest(HostVirtAddr addr) const {
  return Translate<GuestPhysAddr>(regions_, FindHost(addr), Space::kGuest);
}

std::optional<FileOffset> GuestLayout::HostToFile(HostVirtAddr addr) const {
  return Translate<FileOffset>(regions_, FindHost(addr), Space::kFile);
}

std::optional<HostVirtAddr> GuestLayout::FileToHost(FileOffset offset) const {
  return Translate<HostVirtAddr>(regions_, FindFile(offset), Space::kHost);
}

std::optional<FileOffset> GuestLayout::GuestToFile(GuestPhysAddr addr) const {
  return Translate<FileOffset>(regions_, FindGuest(addr), Space::kFile);
}

}  // namespace guestmem
