#include "guestmem/install_policy.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

namespace guestmem {
namespace {

constexpr uint64_t kPage = kPageSize4K;

// A source whose zero extents are given page by page (its bytes are never read here).
class ZeroMapSource final : public PageSource {
 public:
  explicit ZeroMapSource(std::vector<bool> zero) : zero_(std::move(zero)) {}
  uint64_t size() const override { return zero_.size() * kPage; }
  Status ReadAt(FileOffset, std::span<std::byte> out) const override {
    std::memset(out.data(), 1, out.size());
    return OkStatus();
  }
  Result<Extent> ExtentAt(FileOffset offset) const override {
    if (offset.value() >= size()) return Error(ErrorCode::kOutOfRange, "past the end");
    const uint64_t first = offset.value() / kPage;
    uint64_t end = first;
    while (end < zero_.size() && zero_[end] == zero_[first]) ++end;
    return Extent{offset, end * kPage - offset.value(),
                  zero_[first] ? ExtentKind::kZero : ExtentKind::kData};
  }
  std::string Describe() const override { return "zero map"; }

 private:
  std::vector<bool> zero_;
};

GuestLayout TwoRegions(uint64_t pages0, uint64_t pages1, uint64_t page_size = kPage) {
  auto layout = GuestLayout::Create(
      {GuestRegion{GuestPhysAddr(0), pages0 * page_size, FileOffset(0), HostVirtAddr(1ull << 30),
                   page_size},
       GuestRegion{GuestPhysAddr(1ull << 32), pages1 * page_size, FileOffset(pages0 * page_size),
                   HostVirtAddr(1ull << 34), page_size}});
  EXPECT_TRUE(layout.has_value()) << layout.error().ToString();
  return std::move(*layout);
}

TEST(FaultAroundPolicyTest, AlignedWindowClippedToItsRegion) {
  GuestLayout layout = TwoRegions(5, 20);
  FaultAroundPolicy policy(16 * kPage);
  RegionRange w = policy.WindowFor(layout, 0, 3 * kPage);
  EXPECT_EQ(w.region, 0u);
  EXPECT_EQ(w.begin, 0u);
  EXPECT_EQ(w.end, 5 * kPage);  // region 0 has 5 pages only
  w = policy.WindowFor(layout, 1, 17 * kPage);
  EXPECT_EQ(w.begin, 16 * kPage);
  EXPECT_EQ(w.end, 20 * kPage);
  w = policy.WindowFor(layout, 1, 2 * kPage);
  EXPECT_EQ(w.begin, 0u);
  EXPECT_EQ(w.end, 16 * kPage);
  GuestLayout huge = TwoRegions(2, 2, kHugePageSize2M);
  w = policy.WindowFor(huge, 1, kHugePageSize2M);
  EXPECT_EQ(w.begin, kHugePageSize2M);
  EXPECT_EQ(w.end, 2 * kHugePageSize2M);  // one huge page alone
}

TEST(AdaptiveWindowPolicyTest, ALoneFaultBringsItsPageAStreamGrowsAGatheringBringsItsBlock) {
  GuestLayout layout = TwoRegions(64, 256);
  PageTracker tracker(64 + 256);
  AdaptiveWindowPolicy policy(16 * kPage, 8 * kPage);
  auto window = [&](size_t region, uint64_t page) {
    const RegionRange w = policy.WindowFor(layout, region, page * kPage, tracker);
    EXPECT_EQ(w.region, region);
    const uint64_t base = region == 0 ? 0 : 64;
    tracker.Set(base + w.begin / kPage, (w.end - w.begin) / kPage, PageFate::kServed);
    return std::pair(w.begin / kPage, w.end / kPage);
  };
  using Pages = std::pair<uint64_t, uint64_t>;
  // A lone fault: its page alone.
  EXPECT_EQ(window(1, 100), Pages(100, 101));
  // The stream goes on where it ended: 2, 4, 8 pages, then no more than 8.
  EXPECT_EQ(window(1, 101), Pages(101, 103));
  EXPECT_EQ(window(1, 103), Pages(103, 107));
  EXPECT_EQ(window(1, 107), Pages(107, 115));
  EXPECT_EQ(window(1, 115), Pages(115, 123));
  // A fault in a block where a page is served already: the whole (aligned) block.
  EXPECT_EQ(window(1, 130), Pages(130, 131));
  EXPECT_EQ(window(1, 140), Pages(128, 144));
  // Streams in other regions and places are followed side by side; a window stops at its
  // region's end.
  EXPECT_EQ(window(0, 60), Pages(60, 61));
  EXPECT_EQ(window(1, 123), Pages(123, 131));
  EXPECT_EQ(window(0, 61), Pages(61, 63));
  EXPECT_EQ(window(0, 63), Pages(63, 64));
  // A 2 MiB page alone, whatever came before.
  GuestLayout huge = TwoRegions(2, 2, kHugePageSize2M);
  PageTracker huge_tracker(4 * kHugePageSize2M / kPage);
  const RegionRange w = policy.WindowFor(huge, 1, kHugePageSize2M, huge_tracker);
  EXPECT_EQ(w.begin, kHugePageSize2M);
  EXPECT_EQ(w.end, 2 * kHugePageSize2M);
}

TEST(FillCursorTest, WalksEveryRegionOnceInChunksSkippingServedPages) {
  GuestLayout layout = TwoRegions(10, 6);
  PageTracker tracker(16);
  tracker.Set(0, 3, PageFate::kServed);   // the start of region 0
  tracker.Set(12, 4, PageFate::kServed);  // the end of region 1
  FillCursor cursor;
  std::vector<RegionRange> chunks;
  while (auto chunk = cursor.Next(layout, tracker, 4 * kPage)) {
    chunks.push_back(*chunk);
    ASSERT_LE(chunks.size(), 10u);
    cursor.Advance(*chunk);
  }
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0].region, 0u);
  EXPECT_EQ(chunks[0].begin, 3 * kPage);
  EXPECT_EQ(chunks[0].end, 7 * kPage);
  EXPECT_EQ(chunks[1].begin, 7 * kPage);
  EXPECT_EQ(chunks[1].end, 10 * kPage);  // clipped at the region's end
  EXPECT_EQ(chunks[2].region, 1u);
  EXPECT_EQ(chunks[2].begin, 0u);
  EXPECT_EQ(chunks[2].end, 4 * kPage);  // its served pages are left out when it is planned
  // Next() does not move the cursor by itself: a chunk that could not be finished comes back.
  FillCursor again;
  EXPECT_EQ(again.Next(layout, tracker, kPage)->begin, 3 * kPage);
  EXPECT_EQ(again.Next(layout, tracker, kPage)->begin, 3 * kPage);
  // A budget smaller than a page still makes progress: one page.
  EXPECT_EQ(again.Next(layout, tracker, 1)->end, 4 * kPage);
}

std::vector<InstallPiece> Plan(const GuestLayout& layout, RegionRange range,
                               std::optional<uint64_t> fault, bool write,
                               const PageTracker& tracker, const PageSource& source,
                               const PageStateMap* file_pages = nullptr) {
  std::vector<InstallPiece> pieces;
  PlanWindow(layout, range, fault, write, tracker, source, &pieces, file_pages);
  return pieces;
}

void ExpectPiece(const InstallPiece& piece, uint64_t first_page, uint64_t pages, ContentKind kind) {
  EXPECT_EQ(piece.offset, first_page * kPage);
  EXPECT_EQ(piece.length, pages * kPage);
  EXPECT_EQ(piece.kind, kind);
}

TEST(PlanWindowTest, PendingPagesByKindServedOnesLeftOutTheFaultingPageAlways) {
  // Region 1 (file pages 4..19): zero at its pages 2-3, served at 5-6.
  GuestLayout layout = TwoRegions(4, 16);
  std::vector<bool> zero(20, false);
  zero[4 + 2] = zero[4 + 3] = true;
  ZeroMapSource source(zero);
  PageTracker tracker(20);
  tracker.Set(4 + 5, 2, PageFate::kServed);
  auto pieces = Plan(layout, {1, 0, 8 * kPage}, 1 * kPage, false, tracker, source);
  ASSERT_EQ(pieces.size(), 4u);
  ExpectPiece(pieces[0], 0, 2, ContentKind::kData);
  ExpectPiece(pieces[1], 2, 2, ContentKind::kZero);
  ExpectPiece(pieces[2], 4, 1, ContentKind::kData);
  ExpectPiece(pieces[3], 7, 1, ContentKind::kData);
  // The faulting page is installed even when served: with zeros (its content was delivered once,
  // so a second fault means the kernel dropped the page). A write fault's zeros are writable.
  pieces = Plan(layout, {1, 0, 8 * kPage}, 5 * kPage, true, tracker, source);
  ASSERT_EQ(pieces.size(), 5u);
  ExpectPiece(pieces[1], 2, 2, ContentKind::kZeroToWrite);
  ExpectPiece(pieces[2], 4, 1, ContentKind::kData);
  ExpectPiece(pieces[3], 5, 1, ContentKind::kZeroToWrite);
  ExpectPiece(pieces[4], 7, 1, ContentKind::kData);
  // Nothing pending and no fault: nothing to do.
  tracker.Set(0, 20, PageFate::kServed);
  EXPECT_TRUE(Plan(layout, {1, 0, 16 * kPage}, std::nullopt, false, tracker, source).empty());
}

TEST(PlanWindowTest, RemovedPagesAreZerosWithTheirNeighboursPoisonedOnesAreNeverTouched) {
  GuestLayout layout = TwoRegions(16, 16);
  ZeroMapSource source(std::vector<bool>(32, false));
  PageTracker tracker(32);
  tracker.Set(0, 4, PageFate::kRemoved);
  tracker.Set(4, 1, PageFate::kPoisoned);
  tracker.Set(8, 8, PageFate::kRemoved);
  // A fault on a removed page: the whole window's removed pages come as zeros in one piece each.
  auto pieces = Plan(layout, {0, 0, 16 * kPage}, 9 * kPage, false, tracker, source);
  ASSERT_EQ(pieces.size(), 3u);
  ExpectPiece(pieces[0], 0, 4, ContentKind::kZero);
  ExpectPiece(pieces[1], 5, 3, ContentKind::kData);
  ExpectPiece(pieces[2], 8, 8, ContentKind::kZero);
  // Even as the faulting page, a poisoned page is left alone (the handler poisons it again).
  pieces = Plan(layout, {0, 4 * kPage, 5 * kPage}, 4 * kPage, false, tracker, source);
  EXPECT_TRUE(pieces.empty());
}

TEST(PlanWindowTest, AHugePageIsDataIfAnyPartOfItIs) {
  GuestLayout layout = TwoRegions(2, 2, kHugePageSize2M);
  const uint64_t per_huge = kHugePageSize2M / kPage;
  std::vector<bool> zero(4 * per_huge, true);
  zero[per_huge + 100] = false;  // one data page in huge page 1
  ZeroMapSource source(zero);
  PageTracker tracker(4 * per_huge);
  auto pieces = Plan(layout, {0, 0, 2 * kHugePageSize2M}, std::nullopt, false, tracker, source);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].kind, ContentKind::kZero);
  EXPECT_EQ(pieces[0].length, kHugePageSize2M);
  EXPECT_EQ(pieces[1].kind, ContentKind::kData);
  EXPECT_EQ(pieces[1].offset, kHugePageSize2M);
}

TEST(PlanWindowTest, PagesTheGuestMemoryFileHoldsAreOnlyMapped) {
  GuestLayout layout = TwoRegions(8, 8);
  ZeroMapSource source(std::vector<bool>(16, false));
  PageTracker tracker(16);
  PageStateMap file_pages(16);
  file_pages.MarkPrepared(2, 3);
  auto pieces = Plan(layout, {0, 0, 8 * kPage}, std::nullopt, false, tracker, source, &file_pages);
  ASSERT_EQ(pieces.size(), 3u);
  ExpectPiece(pieces[0], 0, 2, ContentKind::kData);
  ExpectPiece(pieces[1], 2, 3, ContentKind::kInFile);
  ExpectPiece(pieces[2], 5, 3, ContentKind::kData);
}

TEST(PlanWindowTest, APageWhoseExtentIsUnknownIsDataSoItsReadReportsTheError) {
  GuestLayout layout = TwoRegions(4, 4);
  ZeroMapSource source(std::vector<bool>(6, true));  // shorter than the layout
  PageTracker tracker(8);
  auto pieces = Plan(layout, {1, 0, 4 * kPage}, std::nullopt, false, tracker, source);
  ASSERT_EQ(pieces.size(), 2u);
  ExpectPiece(pieces[0], 0, 2, ContentKind::kZero);
  ExpectPiece(pieces[1], 2, 2, ContentKind::kData);
}

}  // namespace
}  // namespace guestmem
