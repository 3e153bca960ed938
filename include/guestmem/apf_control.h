// Message 2 of Firecracker's secret-hiding Uffd restore: the APF control message.
//
// After message 1 (handshake.h) Firecracker fills the userfault bitmap, registers its memory slots
// and sends, on the same socket, one sendmsg carrying one of:
//   "no_exitless_apf"   15 bytes, no descriptors: vCPU faults come only as frames
//                       (vcpu_fault_frames.h);
//   "exitless_apf:N"    N the vCPU count in decimal, with 3·N descriptors in vCPU order:
//                       notify eventfd, complete eventfd, KVM vCPU fd (exitless_ring.h).
// No NUL, newline or length prefix. A reader takes at most 15 bytes, and the descriptors end the
// kernel's read at the message's boundary, so the frames after it are never glued to it.
//
// The handler reads it without consuming it first (PeekApfControl): a daemon sets up what it
// announces and hands it to its keeper, then consumes exactly its bytes (ConsumeApfControl). A
// daemon that dies in between leaves the message on the socket for its successor, which can tell
// it from a frame by its first byte (StartsLikeApfControl).
//
// Thread safety: free functions; no shared state.
#ifndef GUESTMEM_APF_CONTROL_H_
#define GUESTMEM_APF_CONTROL_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

inline constexpr std::string_view kNoExitlessApf = "no_exitless_apf";
inline constexpr std::string_view kExitlessApfPrefix = "exitless_apf:";
inline constexpr size_t kApfControlMaxBytes = 15;
// The most vCPUs whose rings a handler takes (3 descriptors each, within SCM_MAX_FD's 253).
inline constexpr uint32_t kMaxExitlessVcpus = 64;

// Where Firecracker looks for the APF socket of the Uffd socket at `uffd_socket_path`: beside it,
// named apf.socket (its parent directory joined with "apf.socket", as Rust's Path does it).
std::string ApfSocketPath(const std::string& uffd_socket_path);

struct ParsedApfControl {
  size_t bytes = 0;    // the message's length
  uint32_t vcpus = 0;  // 0: no exitless APF
};

// Parses the front of a stream that should begin with message 2; `fds` descriptors came with the
// bytes (which, with descriptors, are the whole message). std::nullopt while `data` is a prefix
// of a valid message. ERRORS: kProtocolError for anything else: another text, descriptors with
// no_exitless_apf, a count beyond kMaxExitlessVcpus, a descriptor count other than 3·N.
Result<std::optional<ParsedApfControl>> ParseApfControl(std::string_view data, size_t fds);

// Whether a stream whose first byte is `first` begins with message 2 rather than a frame (whose
// first byte, the low byte of a payload length, is far below 'e' and 'n').
bool StartsLikeApfControl(uint8_t first);

// The VMM's side, in one sendmsg: "no_exitless_apf" when `exitless_fds` is empty, else
// "exitless_apf:N" with the 3·N descriptors. kInvalidArgument for a count not a multiple of 3 or
// beyond kMaxExitlessVcpus; sendmsg's errors as PosixError.
Status SendApfControl(int socket_fd, std::span<const int> exitless_fds, Os* os = nullptr);

struct ApfControl {
  size_t bytes = 0;
  uint32_t vcpus = 0;
  std::vector<UniqueFd> fds;  // 3 * vcpus, close-on-exec: notify, complete, vCPU fd per vCPU
};

// Looks at what a non-blocking socket holds, without consuming it. std::nullopt: not all of the
// message is there yet (call again when readable). ERRORS: ParseApfControl's; kPeerGone at EOF;
// kProtocolError for control data truncated (more descriptors than 3·kMaxExitlessVcpus);
// recvmsg's own as PosixError.
Result<std::optional<ApfControl>> PeekApfControl(int socket_fd, Os* os = nullptr);

// Consumes the `bytes` bytes of a message PeekApfControl returned (closing the copies of its
// descriptors the kernel hands over again). kInternal if the socket holds fewer.
Status ConsumeApfControl(int socket_fd, size_t bytes, Os* os = nullptr);

}  // namespace guestmem

#endif  // GUESTMEM_APF_CONTROL_H_
