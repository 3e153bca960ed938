#include "remote/body_sink.h"

#include <algorithm>
#include <charconv>

#include "remote/url_text.h"

namespace guestmem {
namespace {

bool ParseNumber(std::string_view text, uint64_t* value) {
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *value);
  return !text.empty() && ec == std::errc() && end == text.data() + text.size();
}

}  // namespace

std::optional<ContentRange> ContentRange::Parse(std::string_view value) {
  if (!value.starts_with("bytes ")) return std::nullopt;
  value.remove_prefix(6);
  const size_t dash = value.find('-');
  const size_t slash = value.find('/');
  if (dash == std::string_view::npos || slash == std::string_view::npos || slash < dash) {
    return std::nullopt;
  }
  ContentRange range;
  if (!ParseNumber(value.substr(0, dash), &range.first) ||
      !ParseNumber(value.substr(dash + 1, slash - dash - 1), &range.last) ||
      range.last < range.first) {
    return std::nullopt;
  }
  const std::string_view total = value.substr(slash + 1);
  if (total != "*") {
    uint64_t n = 0;
    // A range that does not end inside its object is no valid answer (RFC 9110, 14.4).
    if (!ParseNumber(total, &n) || range.last >= n) return std::nullopt;
    range.total = n;
  }
  return range;
}

std::optional<uint64_t> UnsatisfiedRangeTotal(std::string_view value) {
  uint64_t total = 0;
  if (value.starts_with("bytes */") && ParseNumber(value.substr(8), &total)) return total;
  return std::nullopt;
}

// ------------------------------------------------------------------------------------------------
// RangeSink

Status RangeSink::Begin(long status, int64_t content_length) {
  // A server that ignores Range answers 200 with the whole object: checked now, so that a large
  // object is not received at all.
  if (status == 200 && content_length >= 0) {
    return CheckWhole(static_cast<uint64_t>(content_length));
  }
  return OkStatus();
}

Status RangeSink::Write(std::span<const std::byte> piece) {
  if (piece.size() > out_.size() - written_) {
    return Error(ErrorCode::kDataLoss, "the answer holds more than the " +
                                           std::to_string(out_.size()) + " bytes asked for");
  }
  std::copy(piece.begin(), piece.end(), out_.begin() + static_cast<ptrdiff_t>(written_));
  written_ += piece.size();
  return OkStatus();
}

Status RangeSink::Finish(const AnswerHead& head) {
  if (head.status == 200) {
    GM_RETURN_IF_ERROR(CheckWhole(
        head.content_length >= 0 ? static_cast<uint64_t>(head.content_length) : written_));
  } else if (head.status == 206) {
    GM_RETURN_IF_ERROR(CheckPartial(head.content_range));
  } else {
    return Error(ErrorCode::kDataLoss, "HTTP " + std::to_string(head.status) + " to a ranged GET");
  }
  if (written_ != out_.size()) {
    return Error(ErrorCode::kDataLoss, "the answer holds " + std::to_string(written_) + " of the " +
                                           std::to_string(out_.size()) + " bytes asked for");
  }
  return OkStatus();
}

Status RangeSink::CheckWhole(uint64_t object_size) const {
  if (range_.offset + range_.length > object_size) return EndsBefore(object_size);
  if (range_.offset != 0 || range_.length != object_size) {
    return Error(ErrorCode::kDataLoss, "the server ignored the range: HTTP 200 with all " +
                                           std::to_string(object_size) + " bytes");
  }
  return OkStatus();
}

Status RangeSink::CheckPartial(const std::string& content_range) const {
  const std::optional<ContentRange> got = ContentRange::Parse(content_range);
  if (!got) {
    return Error(ErrorCode::kDataLoss,
                 "HTTP 206 with Content-Range \"" + Printable(content_range) + "\"");
  }
  // A range that runs past the end is answered with what there is (RGW, nginx, S3).
  if (got->first == range_.offset && got->last < range_.last() && got->total &&
      got->last + 1 == *got->total) {
    return EndsBefore(*got->total);
  }
  if (got->first != range_.offset || got->last != range_.last()) {
    return Error(ErrorCode::kDataLoss,
                 "HTTP 206 for another range: Content-Range \"" + Printable(content_range) + "\"");
  }
  return OkStatus();
}

Error RangeSink::EndsBefore(uint64_t object_size) const {
  return Error(ErrorCode::kOutOfRange, "the object has " + std::to_string(object_size) +
                                           " bytes, fewer than the " +
                                           std::to_string(range_.last() + 1) + " the range needs");
}

// ------------------------------------------------------------------------------------------------
// WholeSink

Status WholeSink::Begin(long /*status*/, int64_t content_length) {
  if (content_length < 0) return OkStatus();
  const auto size = static_cast<uint64_t>(content_length);
  if (size > max_bytes_) return TooLarge("has " + std::to_string(size) + " bytes");
  content_.reserve(size);
  return OkStatus();
}

Status WholeSink::Write(std::span<const std::byte> piece) {
  if (piece.size() > max_bytes_ - content_.size()) return TooLarge("is larger");
  content_.insert(content_.end(), piece.begin(), piece.end());
  return OkStatus();
}

Status WholeSink::Finish(const AnswerHead& head) {
  if (head.status == 206) return Error(ErrorCode::kDataLoss, "HTTP 206 to a GET without a range");
  if (head.content_length >= 0 && static_cast<uint64_t>(head.content_length) != content_.size()) {
    return Error(ErrorCode::kDataLoss, "the answer holds " + std::to_string(content_.size()) +
                                           " of the " + std::to_string(head.content_length) +
                                           " bytes of its Content-Length");
  }
  return OkStatus();
}

Error WholeSink::TooLarge(const std::string& what) const {
  return Error(ErrorCode::kOutOfRange, "the object " + what + ", more than the " +
                                           std::to_string(max_bytes_) + " bytes allowed");
}

}  // namespace guestmem
