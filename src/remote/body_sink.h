// BodySink: where the body of an object store's successful (2xx) answer goes, and the judge of
// whether that answer is what was asked for. A RangeSink takes exactly a byte range into the
// caller's buffer; a WholeSink takes a whole object up to a size bound. Neither ever holds more
// than it was asked for: a piece that would overflow it is refused, which aborts the transfer.
//
// Its Errors carry no URL (the request adds it); none of them is worth trying again.
//
// Thread safety: one request's, used by one thread at a time.
#ifndef GUESTMEM_REMOTE_BODY_SINK_H_
#define GUESTMEM_REMOTE_BODY_SINK_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;  // > 0
  uint64_t last() const { return offset + length - 1; }
  std::string ToString() const {  // "bytes 0-4095", as in messages
    return "bytes " + std::to_string(offset) + "-" + std::to_string(last());
  }
};

// The head of a successful answer.
struct AnswerHead {
  long status = 0;
  int64_t content_length = -1;  // -1: not sent
  std::string content_range;    // "": not sent
};

// A Content-Range header's "bytes FIRST-LAST/TOTAL" or "bytes FIRST-LAST/*".
struct ContentRange {
  uint64_t first = 0, last = 0;
  std::optional<uint64_t> total;  // absent for "/*"
  static std::optional<ContentRange> Parse(std::string_view value);
};
// The TOTAL of a 416's "bytes */TOTAL", if that is what `value` is.
std::optional<uint64_t> UnsatisfiedRangeTotal(std::string_view value);

class BodySink {
 public:
  virtual ~BodySink() = default;
  virtual void Restart() = 0;  // a new attempt begins
  // Before the first byte of the body (not called for an empty one).
  virtual Status Begin(long status, int64_t content_length) = 0;
  virtual Status Write(std::span<const std::byte> piece) = 0;
  // After the whole answer: whether it is what was asked for.
  virtual Status Finish(const AnswerHead& head) = 0;
};

// Exactly `range` of the object, into `out` (of range.length bytes). A 206 must name the range;
// a 200 (a server that ignores Range) is fine when the range is the whole object. An object that
// ends before the range does is kOutOfRange; any other answer is kDataLoss.
class RangeSink final : public BodySink {
 public:
  RangeSink(ByteRange range, std::span<std::byte> out) : range_(range), out_(out) {}

  void Restart() override { written_ = 0; }
  Status Begin(long status, int64_t content_length) override;
  Status Write(std::span<const std::byte> piece) override;
  Status Finish(const AnswerHead& head) override;

 private:
  Status CheckWhole(uint64_t object_size) const;
  Status CheckPartial(const std::string& content_range) const;
  Error EndsBefore(uint64_t object_size) const;

  const ByteRange range_;
  const std::span<std::byte> out_;
  size_t written_ = 0;
};

// The whole object, when it holds at most `max_bytes` (kOutOfRange otherwise, known from the
// Content-Length before any of the body arrives when the server sends one).
class WholeSink final : public BodySink {
 public:
  explicit WholeSink(uint64_t max_bytes) : max_bytes_(max_bytes) {}

  void Restart() override { content_.clear(); }
  Status Begin(long status, int64_t content_length) override;
  Status Write(std::span<const std::byte> piece) override;
  Status Finish(const AnswerHead& head) override;

  std::vector<std::byte> Take() { return std::move(content_); }

 private:
  Error TooLarge(const std::string& what) const;

  const uint64_t max_bytes_;
  std::vector<std::byte> content_;
};

}  // namespace guestmem

#endif  // GUESTMEM_REMOTE_BODY_SINK_H_
