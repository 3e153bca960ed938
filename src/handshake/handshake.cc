#include "guestmem/handshake.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>
#include <vector>

#include "base/hex.h"
#include "guestmem/address.h"
#include "guestmem/os.h"
#include "handshake/scm_rights.h"

namespace guestmem {
namespace {

std::string Index(size_t i) { return std::to_string(i); }

Error Protocol(std::string what) { return Error(ErrorCode::kProtocolError, std::move(what)); }
Error Invalid(std::string what) { return Error(ErrorCode::kInvalidArgument, std::move(what)); }

// A value as an error message shows it: scalars as written (long strings cut), containers by
// kind only (dumping a deeply nested container would recurse once per level).
std::string Show(const nlohmann::json& v) {
  if (v.is_structured()) return std::string("a JSON ") + v.type_name();
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return text;
}

Result<uint64_t> UnsignedField(const nlohmann::json& obj, const char* name, size_t index) {
  const std::string where = "region " + Index(index) + ": ";
  auto it = obj.find(name);
  if (it == obj.end()) return Protocol(where + "missing field \"" + name + "\"");
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  if (it->is_number_integer()) {
    return Protocol(where + "\"" + name + "\" is negative (" + Show(*it) + ")");
  }
  return Protocol(where + "\"" + name + "\" must be a non-negative integer, not " + Show(*it));
}

// The whitespace JSON allows around a value (RFC 8259), and nothing else: not \v or \f, which
// std::isspace would also skip.
bool IsJsonSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

constexpr std::string_view kUtf8ByteOrderMark = "\xEF\xBB\xBF";

// A byte as an error message shows it: 'x' when printable, else 0x1b.
std::string ShowByte(char c) {
  const auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
  char buf[8];
  (void)std::snprintf(buf, sizeof(buf), "0x%02x", u);
  return buf;
}

// Follows the bytes of a handshake as they arrive and finds where its top-level JSON array ends
// (brackets inside strings do not count). Each byte is looked at once across calls.
class ArrayScanner {
 public:
  // Returns the index just past the array's closing bracket, or 0 while it is incomplete. When
  // the data does not start with '[', returns data.size() and not_an_array() turns true.
  size_t Feed(std::string_view data) {
    for (; pos_ < data.size(); ++pos_) {
      const char c = data[pos_];
      if (depth_ == 0) {
        if (IsJsonSpace(c)) continue;
        if (c != '[') {
          not_an_array_ = true;
          return pos_ = data.size();
        }
      }
      if (in_string_) {
        if (escaped_) {
          escaped_ = false;
        } else if (c == '\\') {
          escaped_ = true;
        } else if (c == '"') {
          in_string_ = false;
        }
      } else if (c == '"') {
        in_string_ = true;
      } else if (c == '[' || c == '{') {
        ++depth_;
      } else if ((c == ']' || c == '}') && --depth_ == 0) {
        return ++pos_;
      }
    }
    return 0;
  }

  bool not_an_array() const { return not_an_array_; }

 private:
  size_t pos_ = 0;
  bool not_an_array_ = false;
  int64_t depth_ = 0;
  bool in_string_ = false;
  bool escaped_ = false;
};

// The error for a handshake whose first byte after JSON whitespace is not '[': the parser names
// what it is. Should the parser ever accept what the scanner refused, the first byte is named
// instead: a parse result is never taken for an error.
Error NotAnArray(std::string_view data) {
  auto parsed = ParseHandshake(data);
  if (!parsed) return std::move(parsed).error();
  const size_t first = data.find_first_not_of(" \t\r\n");
  return Protocol(
      "handshake must start with '[' (a JSON array), found " +
      (first == std::string_view::npos ? std::string("nothing") : ShowByte(data[first])) +
      " at byte " + std::to_string(first == std::string_view::npos ? 0 : first));
}

// The first two regions (in `order`, sorted by `start`) whose [start, start + size) overlap.
std::optional<std::pair<size_t, size_t>> FirstOverlap(std::span<const HandshakeRegion> regions,
                                                      uint64_t HandshakeRegion::*start) {
  std::vector<size_t> order(regions.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return regions[a].*start < regions[b].*start; });
  for (size_t k = 1; k < order.size(); ++k) {
    const HandshakeRegion& prev = regions[order[k - 1]];
    // Sizes were checked not to overflow.
    if (prev.*start + prev.size > regions[order[k]].*start) {
      return std::pair(std::min(order[k - 1], order[k]), std::max(order[k - 1], order[k]));
    }
  }
  return std::nullopt;
}

// Sends all of `data` on a stream socket; `control` (if any) rides on the first part.
Status SendAll(Os* os, int socket_fd, std::string_view data, std::span<char> control) {
  size_t done = 0;
  while (done < data.size()) {
    iovec iov{const_cast<char*>(data.data()) + done, data.size() - done};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (done == 0 && !control.empty()) {
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
    }
    const ssize_t n = os->Sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
    if (n == -EINTR) continue;
    if (n < 0) {
      return PosixError(static_cast<int>(-n), "send_handshake: sendmsg of " +
                                                  std::to_string(data.size() - done) +
                                                  " bytes at byte " + std::to_string(done));
    }
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

}  // namespace

std::string EncodeHandshake(std::span<const HandshakeRegion> regions) {
  nlohmann::ordered_json array = nlohmann::ordered_json::array();
  for (const HandshakeRegion& r : regions) {
    nlohmann::ordered_json obj;
    obj["base_host_virt_addr"] = r.base_host_virt_addr;
    obj["size"] = r.size;
    obj["offset"] = r.offset;
    obj["page_size"] = r.page_size;
    obj["page_size_kib"] = r.page_size_kib.value_or(r.page_size);
    if (r.gpa_start) obj["gpa_start"] = *r.gpa_start;
    if (r.is_guest_memfd) obj["is_guest_memfd"] = *r.is_guest_memfd;
    array.push_back(std::move(obj));
  }
  return array.dump();
}

Result<std::vector<HandshakeRegion>> ParseHandshake(std::string_view json) {
  // nlohmann::json skips a leading byte order mark; Firecracker never sends one, and the stream
  // scanner that finds where the array ends does not skip it either: both must refuse it.
  if (json.substr(0, kUtf8ByteOrderMark.size()) == kUtf8ByteOrderMark) {
    return Protocol(
        "handshake starts with a UTF-8 byte order mark (0xef 0xbb 0xbf); a JSON array must start "
        "with '['");
  }
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(json);
  } catch (const nlohmann::json::exception& e) {
    return Protocol(std::string("handshake is not valid JSON: ") + e.what());
  }
  if (!doc.is_array()) {
    return Protocol(std::string("handshake must be a JSON array, not a JSON ") + doc.type_name());
  }
  if (doc.empty()) return Protocol("handshake has no regions (empty JSON array)");
  std::vector<HandshakeRegion> regions;
  regions.reserve(doc.size());
  for (size_t i = 0; i < doc.size(); ++i) {
    const nlohmann::json& obj = doc[i];
    if (!obj.is_object()) {
      return Protocol("region " + Index(i) + " is not a JSON object: " + Show(obj));
    }
    HandshakeRegion r;
    GM_ASSIGN_OR_RETURN(r.base_host_virt_addr, UnsignedField(obj, "base_host_virt_addr", i));
    GM_ASSIGN_OR_RETURN(r.size, UnsignedField(obj, "size", i));
    GM_ASSIGN_OR_RETURN(r.offset, UnsignedField(obj, "offset", i));
    const bool has_page_size = obj.contains("page_size");
    const bool has_kib = obj.contains("page_size_kib");
    // Firecracker releases before page_size existed sent only page_size_kib (also in bytes).
    if (has_page_size || !has_kib) {
      GM_ASSIGN_OR_RETURN(r.page_size, UnsignedField(obj, "page_size", i));
    }
    if (has_kib) {
      GM_ASSIGN_OR_RETURN(uint64_t kib, UnsignedField(obj, "page_size_kib", i));
      r.page_size_kib = kib;
      if (!has_page_size) r.page_size = kib;
      if (kib != r.page_size) {
        return Protocol("region " + Index(i) + ": page_size_kib " + std::to_string(kib) +
                        " disagrees with page_size " + std::to_string(r.page_size) +
                        " (both are in bytes)");
      }
    }
    if (obj.contains("gpa_start")) {
      GM_ASSIGN_OR_RETURN(uint64_t gpa, UnsignedField(obj, "gpa_start", i));
      r.gpa_start = gpa;
    }
    if (auto it = obj.find("is_guest_memfd"); it != obj.end()) {
      if (!it->is_boolean()) {
        return Protocol("region " + Index(i) + ": \"is_guest_memfd\" must be a boolean, not " +
                        Show(*it));
      }
      r.is_guest_memfd = it->get<bool>();
    }
    regions.push_back(r);
  }
  return regions;
}

Status ValidateHandshake(std::span<const HandshakeRegion> regions, uint64_t file_size) {
  if (regions.empty()) return Invalid("validate_handshake: no regions");
  for (size_t i = 0; i < regions.size(); ++i) {
    const HandshakeRegion& r = regions[i];
    const std::string where = "validate_handshake: region " + Index(i) + ": ";
    if (r.page_size != kPageSize4K && r.page_size != kHugePageSize2M) {
      return Invalid(where + "page_size " + std::to_string(r.page_size) +
                     " is neither 4096 nor 2097152");
    }
    if (r.size == 0) return Invalid(where + "size is zero");
    const std::pair<const char*, uint64_t> fields[] = {
        {"base_host_virt_addr", r.base_host_virt_addr}, {"size", r.size}, {"offset", r.offset}};
    for (const auto& [name, value] : fields) {
      if (!IsAligned(value, r.page_size)) {
        return Invalid(where + name + " " + Hex(value) + " is not aligned to page_size " +
                       std::to_string(r.page_size));
      }
    }
    if (!CheckedAdd(r.base_host_virt_addr, r.size)) {
      return Invalid(where + "base_host_virt_addr " + Hex(r.base_host_virt_addr) + " + size " +
                     Hex(r.size) + " overflows");
    }
    const std::optional<uint64_t> end = CheckedAdd(r.offset, r.size);
    if (!end) {
      return Invalid(where + "offset " + Hex(r.offset) + " + size " + Hex(r.size) + " overflows");
    }
    if (*end > file_size) {
      return Invalid(where + "offset " + Hex(r.offset) + " + size " + Hex(r.size) +
                     " lies beyond the end of the memory file (" + Hex(file_size) + " bytes)");
    }
  }
  if (auto pair = FirstOverlap(regions, &HandshakeRegion::base_host_virt_addr)) {
    return Invalid("validate_handshake: regions " + Index(pair->first) + " and " +
                   Index(pair->second) + " overlap in host addresses");
  }
  if (auto pair = FirstOverlap(regions, &HandshakeRegion::offset)) {
    return Invalid("validate_handshake: regions " + Index(pair->first) + " and " +
                   Index(pair->second) + " overlap in the memory file");
  }
  return OkStatus();
}

Status SendHandshake(int socket_fd, std::span<const HandshakeRegion> regions,
                     std::span<const int> fds, Os* os) {
  if (os == nullptr) os = Os::Default();
  const std::string json = EncodeHandshake(regions);
  std::vector<char> control = ScmRightsControl(fds);
  return SendAll(os, socket_fd, json, control);
}

// Room for more descriptors than anybody should send, so a few extra are closed rather than
// reported as truncated control data.
constexpr size_t kControlFds = 16;
// What one ReadFrom call takes at most: one read of a full buffer, four times over.
constexpr size_t kReadBytes = 64 * 1024;
constexpr int kReadsPerCall = 4;

struct HandshakeReader::State {
  State(size_t max, Os* o)
      : max_fds(max),
        os(o == nullptr ? Os::Default() : o),
        control(CMSG_SPACE(sizeof(int) * std::max(max, kControlFds))) {}

  const size_t max_fds;
  Os* const os;
  std::vector<char> control;  // for the SCM_RIGHTS of each read
  ReceivedHandshake out;
  ArrayScanner scanner;
  bool done = false;  // complete or failed: nothing more is read
};

HandshakeReader::HandshakeReader(size_t max_fds, Os* os)
    : s_(std::make_unique<State>(max_fds, os)) {}
HandshakeReader::~HandshakeReader() = default;
HandshakeReader::HandshakeReader(HandshakeReader&&) noexcept = default;
HandshakeReader& HandshakeReader::operator=(HandshakeReader&&) noexcept = default;

size_t HandshakeReader::bytes_received() const { return s_->out.raw_json.size(); }

ReceivedHandshake HandshakeReader::Take() { return std::move(s_->out); }

Result<HandshakeReader::Progress> HandshakeReader::ReadFrom(int socket_fd) {
  State& s = *s_;
  if (s.done) {
    return Error(ErrorCode::kFailedPrecondition,
                 "receive_handshake: the handshake was complete or refused already");
  }
  // Whatever happens below ends the reading, except a read that leaves the array incomplete.
  s.done = true;
  ReceivedHandshake& out = s.out;
  const size_t control_fds = std::max(s.max_fds, kControlFds);
  char buf[kReadBytes];
  for (int reads = 0; reads < kReadsPerCall;) {
    iovec iov{buf, std::min(sizeof(buf), kMaxHandshakeBytes + 1 - out.raw_json.size())};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = s.control.data();
    msg.msg_controllen = s.control.size();
    const ssize_t n = s.os->Recvmsg(socket_fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n == -EINTR) continue;
    if (n == -EAGAIN || n == -EWOULDBLOCK) {
      s.done = false;
      return Progress::kNeedMore;
    }
    if (n < 0) return PosixError(static_cast<int>(-n), "receive_handshake: recvmsg");
    ++reads;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        UniqueFd owned(fd);  // one beyond max_fds is closed right here
        if (out.fds.size() < s.max_fds) out.fds.push_back(std::move(owned));
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
      return Protocol("receive_handshake: control data truncated (more than " +
                      std::to_string(control_fds) +
                      " descriptors attached, or the receiver is out of descriptors)");
    }
    if (n == 0) {
      if (out.raw_json.empty()) {
        return Error(ErrorCode::kPeerGone,
                     "receive_handshake: the peer hung up without a handshake");
      }
      return Protocol("truncated handshake after " + std::to_string(out.raw_json.size()) +
                      " bytes (the peer closed the connection)");
    }
    out.raw_json.append(buf, static_cast<size_t>(n));
    if (out.raw_json.size() > kMaxHandshakeBytes) {
      return Protocol("receive_handshake: handshake larger than " +
                      std::to_string(kMaxHandshakeBytes) + " bytes");
    }
    const size_t end = s.scanner.Feed(out.raw_json);
    if (end == 0) continue;
    if (s.scanner.not_an_array()) return NotAnArray(out.raw_json);
    const std::string_view rest = std::string_view(out.raw_json).substr(end);
    if (rest.find_first_not_of(" \t\r\n") != std::string_view::npos) {
      GM_RETURN_IF_ERROR(ParseHandshake(std::string_view(out.raw_json).substr(0, end)));
      return Protocol("receive_handshake: unexpected bytes after the JSON array at byte " +
                      std::to_string(end));
    }
    GM_ASSIGN_OR_RETURN(out.regions, ParseHandshake(out.raw_json));
    if (out.fds.empty()) {
      return Protocol("receive_handshake: no userfaultfd descriptor attached (SCM_RIGHTS)");
    }
    return Progress::kComplete;
  }
  s.done = false;  // more may be waiting: the socket is still readable
  return Progress::kNeedMore;
}

Result<ReceivedHandshake> ReceiveHandshake(int socket_fd, std::chrono::milliseconds timeout,
                                           size_t max_fds, Os* os) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline = Clock::now() + timeout;
  HandshakeReader reader(max_fds, os);
  while (true) {
    GM_ASSIGN_OR_RETURN(HandshakeReader::Progress progress, reader.ReadFrom(socket_fd));
    if (progress == HandshakeReader::Progress::kComplete) return reader.Take();
    int ready = 0;
    do {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) {
        ready = 0;
        break;
      }
      pollfd pfd{socket_fd, POLLIN, 0};
      ready = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX)));
    } while (ready < 0 && errno == EINTR);
    if (ready < 0) return PosixError(errno, "receive_handshake: poll");
    if (ready == 0) {
      return Protocol("receive_handshake: no complete handshake within " +
                      std::to_string(timeout.count()) + " ms (" +
                      std::to_string(reader.bytes_received()) + " bytes received)");
    }
  }
}

}  // namespace guestmem
