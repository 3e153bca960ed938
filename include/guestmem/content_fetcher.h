// ContentFetcher: the fault pipeline's stage that reads snapshot content for an install.
//
// Where the source offers a view of its content in place (PageSource::HoldView: a raw file mapped
// read-only, a packed snapshot's decompressed chunk) and the caller lets it, a fetch returns that view and copies nothing: the install's
// own copy (UFFDIO_COPY, pwrite into the guest memory file) is the only one. Otherwise it reads
// the range into a staging buffer it owns (private anonymous memory, reserved lazily). What a
// fetch returns stays valid until the next Fetch. A view is for the kernel to copy from only
// (see PageSource::View): its bytes are never to be touched in user space.
//
// Thread safety: one thread at a time; bytes_read() from any thread.
#ifndef GUESTMEM_CONTENT_FETCHER_H_
#define GUESTMEM_CONTENT_FETCHER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "guestmem/address.h"
#include "guestmem/mapping.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"

namespace guestmem {

class ContentFetcher {
 public:
  // `capacity`: the largest range one Fetch reads (a multiple of 4 KiB, > 0). `use_views`: hand
  // out the source's views where it has them (the caller's installs only pass content to the
  // kernel).
  static Result<std::unique_ptr<ContentFetcher>> Create(std::shared_ptr<const PageSource> source,
                                                        uint64_t capacity, bool use_views = false);

  const PageSource& source() const { return *source_; }
  const std::shared_ptr<const PageSource>& shared_source() const { return source_; }
  uint64_t capacity() const { return buffer_.size(); }

  // The content of [offset, offset + length), valid until the next Fetch.
  // REQUIRES: 0 < length <= capacity().
  // ERRORS: the source's (kOutOfRange, kDataLoss for a truncated source, kIoError).
  Result<std::span<const std::byte>> Fetch(FileOffset offset, uint64_t length);

  uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  bool uses_views() const { return use_views_; }

 private:
  ContentFetcher(std::shared_ptr<const PageSource> source, Mapping buffer, bool use_views)
      : source_(std::move(source)), buffer_(std::move(buffer)), use_views_(use_views) {}

  std::shared_ptr<const PageSource> source_;
  Mapping buffer_;
  bool use_views_;
  std::shared_ptr<const void> held_;  // what the last view needs kept (a decompressed chunk)
  std::atomic<uint64_t> bytes_read_{0};
};

}  // namespace guestmem

#endif  // GUESTMEM_CONTENT_FETCHER_H_
