#include "guestmem/apf_control.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "guestmem/os.h"
#include "handshake/scm_rights.h"

namespace guestmem {
namespace {

Error Protocol(const std::string& what) {
  return Error(ErrorCode::kProtocolError, "APF control message: " + what);
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// The bytes as a log line shows them: printable ASCII as is, others as \xNN.
std::string Show(std::string_view data) {
  std::string out = "\"";
  for (const char c : data) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f && c != '"' && c != '\\') {
      out += c;
    } else {
      char buf[8];
      (void)std::snprintf(buf, sizeof(buf), "\\x%02x", u);
      out += buf;
    }
  }
  return out + "\"";
}

bool IsPrefixOf(std::string_view data, std::string_view whole) {
  return data.size() <= whole.size() && whole.substr(0, data.size()) == data;
}

// Room for every descriptor a valid message carries and a few more, so that a few extra are
// counted (and refused) rather than reported as truncated control data.
constexpr size_t kControlFds = 3 * kMaxExitlessVcpus + 16;

}  // namespace

std::string ApfSocketPath(const std::string& uffd_socket_path) {
  return (std::filesystem::path(uffd_socket_path).parent_path() / "apf.socket").string();
}

Result<std::optional<ParsedApfControl>> ParseApfControl(std::string_view data, size_t fds) {
  data = data.substr(0, kApfControlMaxBytes);
  if (IsPrefixOf(data, kNoExitlessApf)) {
    if (fds > 0) {
      return Protocol(std::to_string(fds) + " descriptor(s) came with " + Show(data) +
                      "; no_exitless_apf carries none");
    }
    if (data.size() < kNoExitlessApf.size()) return std::optional<ParsedApfControl>();
    return std::optional<ParsedApfControl>(ParsedApfControl{kNoExitlessApf.size(), 0});
  }
  if (IsPrefixOf(data, kExitlessApfPrefix) && data.size() < kExitlessApfPrefix.size()) {
    if (fds > 0) return Protocol(Show(data) + " is cut short (its descriptors came with it)");
    return std::optional<ParsedApfControl>();
  }
  if (data.substr(0, kExitlessApfPrefix.size()) != kExitlessApfPrefix) {
    return Protocol("expected no_exitless_apf or exitless_apf:N, found " + Show(data));
  }
  size_t end = kExitlessApfPrefix.size();
  while (end < data.size() && IsDigit(data[end])) ++end;
  const bool ended = fds > 0 || end < data.size() || end == kApfControlMaxBytes;
  if (!ended) return std::optional<ParsedApfControl>();  // more digits may come
  if (fds > 0 && end < data.size()) {
    return Protocol(Show(data) + ": the vCPU count is not a decimal number");
  }
  const std::string_view digits =
      data.substr(kExitlessApfPrefix.size(), end - kExitlessApfPrefix.size());
  if (digits.empty()) return Protocol(Show(data) + " has no vCPU count");
  uint64_t vcpus = 0;
  for (const char c : digits) {
    vcpus = vcpus * 10 + static_cast<uint64_t>(c - '0');  // at most 2 digits fit in 15 bytes
  }
  if (vcpus > kMaxExitlessVcpus) {
    return Protocol(Show(data.substr(0, end)) + ": more than " + std::to_string(kMaxExitlessVcpus) +
                    " vCPUs");
  }
  if (fds != 3 * vcpus) {
    return Protocol(Show(data.substr(0, end)) + " came with " + std::to_string(fds) +
                    " descriptor(s); 3 per vCPU (" + std::to_string(3 * vcpus) + ") expected");
  }
  return std::optional<ParsedApfControl>(ParsedApfControl{end, static_cast<uint32_t>(vcpus)});
}

bool StartsLikeApfControl(uint8_t first) {
  return first == static_cast<uint8_t>(kNoExitlessApf[0]) ||
         first == static_cast<uint8_t>(kExitlessApfPrefix[0]);
}

Status SendApfControl(int socket_fd, std::span<const int> exitless_fds, Os* os) {
  if (os == nullptr) os = Os::Default();
  if (exitless_fds.size() % 3 != 0 || exitless_fds.size() > 3 * kMaxExitlessVcpus) {
    return Error(ErrorCode::kInvalidArgument,
                 "send_apf_control: " + std::to_string(exitless_fds.size()) +
                     " descriptors: 3 per vCPU, at most " + std::to_string(kMaxExitlessVcpus) +
                     " vCPUs");
  }
  const std::string text = exitless_fds.empty() ? std::string(kNoExitlessApf)
                                                : std::string(kExitlessApfPrefix) +
                                                      std::to_string(exitless_fds.size() / 3);
  std::vector<char> control = ScmRightsControl(exitless_fds);
  iovec iov{const_cast<char*>(text.data()), text.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!control.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
  }
  while (true) {
    const ssize_t n = os->Sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
    if (n == -EINTR) continue;
    if (n < 0) return PosixError(static_cast<int>(-n), "send_apf_control: sendmsg");
    // 15 bytes at most: a stream socket takes them whole or not at all.
    if (static_cast<size_t>(n) != text.size()) {
      return Error(ErrorCode::kInternal, "send_apf_control: sendmsg took " + std::to_string(n) +
                                             " of " + std::to_string(text.size()) + " bytes");
    }
    return OkStatus();
  }
}

namespace {

// One recvmsg of at most `bytes` bytes with room for kControlFds descriptors.
struct Received {
  ssize_t n = 0;  // -errno on failure
  std::vector<UniqueFd> fds;
  bool truncated = false;
};

Received ReceiveOnce(Os* os, int socket_fd, char* buf, size_t bytes, int flags) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kControlFds)];
  Received out;
  while (true) {
    iovec iov{buf, bytes};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    out.n = os->Recvmsg(socket_fd, &msg, flags | MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (out.n == -EINTR) continue;
    if (out.n < 0) return out;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(fd);
      }
    }
    out.truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
    return out;
  }
}

}  // namespace

Result<std::optional<ApfControl>> PeekApfControl(int socket_fd, Os* os) {
  if (os == nullptr) os = Os::Default();
  char buf[kApfControlMaxBytes];
  Received got = ReceiveOnce(os, socket_fd, buf, sizeof(buf), MSG_PEEK);
  if (got.n == -EAGAIN || got.n == -EWOULDBLOCK) return std::optional<ApfControl>();
  if (got.n < 0) return PosixError(static_cast<int>(-got.n), "APF control message: recvmsg");
  if (got.truncated) {
    return Protocol("control data truncated (more than " + std::to_string(kControlFds) +
                    " descriptors attached, or the receiver is out of descriptors)");
  }
  if (got.n == 0) {
    return Error(ErrorCode::kPeerGone, "APF control message: the peer hung up before sending it");
  }
  GM_ASSIGN_OR_RETURN(
      const std::optional<ParsedApfControl> parsed,
      ParseApfControl(std::string_view(buf, static_cast<size_t>(got.n)), got.fds.size()));
  if (!parsed) return std::optional<ApfControl>();
  ApfControl out;
  out.bytes = parsed->bytes;
  out.vcpus = parsed->vcpus;
  out.fds = std::move(got.fds);
  return std::optional<ApfControl>(std::move(out));
}

Status ConsumeApfControl(int socket_fd, size_t bytes, Os* os) {
  if (os == nullptr) os = Os::Default();
  char buf[kApfControlMaxBytes];
  if (bytes > sizeof(buf)) {
    return Error(ErrorCode::kInvalidArgument,
                 "APF control message: " + std::to_string(bytes) + " bytes is no such message");
  }
  const Received got = ReceiveOnce(os, socket_fd, buf, bytes, 0);  // its descriptors close here
  if (got.n < 0) return PosixError(static_cast<int>(-got.n), "APF control message: recvmsg");
  if (static_cast<size_t>(got.n) != bytes) {
    return Error(ErrorCode::kInternal, "APF control message: " + std::to_string(got.n) +
                                           " bytes consumed of the " + std::to_string(bytes) +
                                           " looked at");
  }
  return OkStatus();
}

}  // namespace guestmem
