#include "guestmem/content_fetcher.h"

#include <sys/mman.h>

#include <cassert>
#include <string>

namespace guestmem {

Result<std::unique_ptr<ContentFetcher>> ContentFetcher::Create(
    std::shared_ptr<const PageSource> source, uint64_t capacity, bool use_views) {
  if (source == nullptr) return Error(ErrorCode::kInvalidArgument, "content fetcher: no source");
  if (capacity == 0 || !IsAligned(capacity, kPageSize4K)) {
    return Error(ErrorCode::kInvalidArgument, "content fetcher: capacity " +
                                                  std::to_string(capacity) +
                                                  " is not a positive multiple of 4096");
  }
  // MAP_NORESERVE: only the part a fetch touches ever costs memory.
  GM_ASSIGN_OR_RETURN(Mapping buffer, Mapping::Anonymous(capacity, MAP_NORESERVE));
  return std::unique_ptr<ContentFetcher>(
      new ContentFetcher(std::move(source), std::move(buffer), use_views));
}

Result<std::span<const std::byte>> ContentFetcher::Fetch(FileOffset offset, uint64_t length) {
  assert(length > 0 && length <= buffer_.size());
  held_.reset();
  if (use_views_) {
    GM_ASSIGN_OR_RETURN(PageSource::HeldView view, source_->HoldView(offset, length));
    if (!view.bytes.empty()) {
      held_ = std::move(view.keep);
      bytes_read_.fetch_add(length, std::memory_order_relaxed);
      return view.bytes;
    }
  }
  std::span<std::byte> into = buffer_.span().first(length);
  GM_RETURN_IF_ERROR(source_->ReadAt(offset, into));
  bytes_read_.fetch_add(length, std::memory_order_relaxed);
  return std::span<const std::byte>(into);
}

}  // namespace guestmem
