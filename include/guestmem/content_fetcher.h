// ContentFetcher: the fault pipeline's stage that reads snapshot content for an install.
//
// It owns a staging buffer (private anonymous memory, reserved lazily) and reads the requested
// range of a PageSource into it. The view it returns stays valid until the next Fetch.
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
  // `capacity`: the largest range one Fetch reads (a multiple of 4 KiB, > 0).
  static Result<std::unique_ptr<ContentFetcher>> Create(std::shared_ptr<const PageSource> source,
                                                        uint64_t capacity);

  const PageSource& source() const { return *source_; }
  const std::shared_ptr<const PageSource>& shared_source() const { return source_; }
  uint64_t capacity() const { return buffer_.size(); }

  // The content of [offset, offset + length), valid until the next Fetch.
  // REQUIRES: 0 < length <= capacity().
  // ERRORS: the source's (kOutOfRange, kDataLoss for a truncated source, kIoError).
  Result<std::span<const std::byte>> Fetch(FileOffset offset, uint64_t length);

  uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  ContentFetcher(std::shared_ptr<const PageSource> source, Mapping buffer)
      : source_(std::move(source)), buffer_(std::move(buffer)) {}

  std::shared_ptr<const PageSource> source_;
  Mapping buffer_;
  std::atomic<uint64_t> bytes_read_{0};
};

}  // namespace guestmem

#endif  // GUESTMEM_CONTENT_FETCHER_H_
