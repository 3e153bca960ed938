#include "guestmem/install_policy.h"

#include <algorithm>
#include <cassert>

namespace guestmem {
namespace {

uint64_t PageIndex(uint64_t file_offset) { return file_offset / kPageSize4K; }

}  // namespace

RegionRange FaultAroundPolicy::WindowFor(const GuestLayout& layout, size_t region,
                                         uint64_t page_offset) const {
  const GuestRegion& r = layout.regions()[region];
  if (r.page_size != kPageSize4K) return {region, page_offset, page_offset + r.page_size};
  const uint64_t begin = AlignDown(page_offset, window_);
  return {region, begin, std::min(begin + window_, r.size)};
}

RegionRange AdaptiveWindowPolicy::WindowFor(const GuestLayout& layout, size_t region,
                                            uint64_t page_offset, const PageTracker& tracker) {
  const GuestRegion& r = layout.regions()[region];
  const RegionRange page{region, page_offset, page_offset + r.page_size};
  if (r.page_size != kPageSize4K) return page;  // a huge page alone
  ++clock_;
  Stream* oldest = &streams_[0];
  for (Stream& s : streams_) {
    if (s.region == region && s.last_end == page_offset && s.last_end > s.last_begin) {
      // The stream goes on where its last window ended: twice that window, from here.
      const uint64_t grown = std::min(2 * (s.last_end - s.last_begin), max_stream_);
      const RegionRange install{region, page_offset, std::min(page_offset + grown, r.size)};
      s = Stream{region, install.begin, install.end, clock_};
      return install;
    }
    if (s.last_used < oldest->last_used) oldest = &s;
  }
  const uint64_t block_begin = AlignDown(page_offset, block_);
  const uint64_t block_end = std::min(block_begin + block_, r.size);
  const uint64_t served = tracker.CountIn(PageIndex(r.file_offset.value() + block_begin),
                                          (block_end - block_begin) / kPageSize4K,
                                          PageFate::kServed);
  // Faults gathering in a block: the rest of it is likely to follow. Otherwise one page; a
  // stream starts from it either way.
  const RegionRange install =
      served >= kDenseAfter ? RegionRange{region, block_begin, block_end} : page;
  *oldest = Stream{region, install.begin, install.end, clock_};
  return install;
}

std::optional<RegionRange> FillCursor::Next(const GuestLayout& layout, const PageTracker& tracker,
                                            uint64_t max_bytes) {
  const std::vector<GuestRegion>& regions = layout.regions();
  for (; region_ < regions.size(); ++region_, offset_ = 0) {
    const GuestRegion& r = regions[region_];
    const uint64_t base = r.file_offset.value();
    const uint64_t first = tracker.NextPending(PageIndex(base + offset_), PageIndex(base + r.size));
    const uint64_t begin = AlignDown(first * kPageSize4K - base, r.page_size);
    if (begin >= r.size) continue;
    const uint64_t step = std::max(AlignDown(max_bytes, r.page_size), r.page_size);
    return RegionRange{region_, begin, std::min(begin + step, r.size)};
  }
  return std::nullopt;
}

void FillCursor::Advance(const RegionRange& chunk) {
  region_ = chunk.region;
  offset_ = chunk.end;
}

void PlanWindow(const GuestLayout& layout, const RegionRange& range,
                std::optional<uint64_t> fault_page, bool write_fault, const PageTracker& tracker,
                const PageSource& source, std::vector<InstallPiece>* out,
                const PageStateMap* file_pages) {
  const GuestRegion& region = layout.regions()[range.region];
  const uint64_t page = region.page_size;
  const ContentKind zero = write_fault ? ContentKind::kZeroToWrite : ContentKind::kZero;
  // The source extent around the last page looked at (length 0 until one is found).
  Extent extent{.length = 0};
  InstallPiece piece{.length = 0};
  auto flush = [&] {
    if (piece.length > 0) out->push_back(piece);
    piece.length = 0;
  };
  for (uint64_t offset = range.begin; offset < range.end; offset += page) {
    const uint64_t file_offset = region.file_offset.value() + offset;
    // Pages are marked whole (every 4 KiB entry of a huge page at once): the first tells.
    const PageFate fate = tracker.Fate(PageIndex(file_offset));
    const bool is_fault_page = fault_page == offset;
    // Poison stays until the guest discards the page; a mapped page is installed again only
    // when it faults (the kernel dropped it).
    if (fate == PageFate::kPoisoned || (fate == PageFate::kServed && !is_fault_page)) {
      flush();
      continue;
    }
    ContentKind kind = zero;
    if (file_pages != nullptr && file_pages->Get(file_offset / page) == PageState::kPrepared) {
      kind = ContentKind::kInFile;
    } else if (fate == PageFate::kPending) {
      if (extent.length == 0 || file_offset < extent.offset.value() ||
          file_offset >= extent.offset.value() + extent.length) {
        auto found = source.ExtentAt(FileOffset(file_offset));
        extent = found ? *found : Extent{.length = 0};
      }
      const bool all_zero = extent.length != 0 && extent.kind == ExtentKind::kZero &&
                            extent.offset.value() + extent.length >= file_offset + page;
      kind = all_zero ? zero : ContentKind::kData;
    }
    if (piece.length > 0 && kind != piece.kind) flush();
    if (piece.length == 0) piece = InstallPiece{offset, 0, kind};
    piece.length += page;
  }
  flush();
}

}  // namespace guestmem
