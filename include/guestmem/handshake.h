// The Firecracker Uffd handshake: how a VMM hands its guest memory to a page-fault handler.
//
// The VMM connects to the handler's Unix socket and sends ONE message: a JSON array with an object
// per guest memory region, and its userfaultfd as an SCM_RIGHTS descriptor. Fields, in this order:
//   base_host_virt_addr  where the region is mapped in the VMM
//   size                 bytes
//   offset               where the region's content starts in the memory file
//   page_size            bytes (4096, or 2097152 for huge pages)
//   page_size_kib        deprecated; despite its name, also bytes
// The secret-hiding variant adds gpa_start and is_guest_memfd to each region and sends three
// descriptors: the uffd, the guest memory file (guest_memfd) and a bitmap memfd.
//
// This header offers both sides: encode/send (the VMM's, used by `gmem vmm-sim` and tests) and
// receive/parse/validate (the handler's), blocking (ReceiveHandshake) or incrementally from an
// event loop (HandshakeReader); both share one scanner and one parser.
//
// Thread safety: free functions with no shared state; a HandshakeReader belongs to one thread.
#ifndef GUESTMEM_HANDSHAKE_H_
#define GUESTMEM_HANDSHAKE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

struct HandshakeRegion {
  uint64_t base_host_virt_addr = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  uint64_t page_size = 0;
  std::optional<uint64_t> page_size_kib;  // deprecated; bytes despite its name
  std::optional<uint64_t> gpa_start;      // secret-hiding variant
  std::optional<bool> is_guest_memfd;     // secret-hiding variant
};

// Compact JSON exactly as Firecracker writes it (fields in its order).
std::string EncodeHandshake(std::span<const HandshakeRegion> regions);

// Parses the JSON; kProtocolError naming what is wrong: not JSON (with the parser's position), not
// an array, an empty array, an element not an object, a missing field, a field of the wrong type,
// a negative or non-integer number, page_size_kib disagreeing with page_size. A region with only
// page_size_kib (older Firecracker) takes its page size from it. Unknown fields are ignored.
Result<std::vector<HandshakeRegion>> ParseHandshake(std::string_view json);

// Checks the regions for serving from a memory file of `file_size` bytes; kInvalidArgument naming
// the region: page_size 4096 or 2097152; base_host_virt_addr, size and offset aligned to it;
// size > 0; no overflow; no two regions overlapping in host addresses or in file offsets;
// offset + size inside the file.
Status ValidateHandshake(std::span<const HandshakeRegion> regions, uint64_t file_size);

// The VMM's side: the JSON with `fds` attached as SCM_RIGHTS, in one sendmsg (the socket may take
// only part of a long message; the rest follows without descriptors). Errors from sendmsg as
// PosixError (EPIPE: kPeerGone).
Status SendHandshake(int socket_fd, std::span<const HandshakeRegion> regions,
                     std::span<const int> fds, Os* os = nullptr);

struct ReceivedHandshake {
  std::vector<HandshakeRegion> regions;
  std::vector<UniqueFd> fds;
  std::string raw_json;
};

// The largest handshake accepted (Firecracker's is about 170 bytes per region).
inline constexpr size_t kMaxHandshakeBytes = size_t{1} << 20;

// HandshakeReader: the handler's side, incrementally, for an event loop that serves many
// connections from one thread. Call ReadFrom() whenever the socket is readable: it takes what
// the socket holds with non-blocking recvmsg calls and never waits. It collects descriptors from
// every part of the message (received close-on-exec; those beyond `max_fds` are closed at once).
// Its buffer grows only with the bytes received, up to kMaxHandshakeBytes. Once the JSON array
// is complete it stops reading, so whatever follows on the socket (Firecracker's second message
// and its framed requests) is left there for the next reader.
//
// Thread safety: one thread at a time.
class HandshakeReader {
 public:
  enum class Progress {
    kNeedMore,  // nothing more to read now: call again when the socket is readable
    kComplete,  // Take() the handshake
  };

  explicit HandshakeReader(size_t max_fds = 3, Os* os = nullptr);
  ~HandshakeReader();
  HandshakeReader(HandshakeReader&&) noexcept;
  HandshakeReader& operator=(HandshakeReader&&) noexcept;

  // Reads what `socket_fd` holds now, at most 256 KiB per call (the socket stays readable when
  // more is waiting, so one busy peer cannot keep its caller). ERRORS: kProtocolError for EOF
  // before the array completes ("truncated handshake after N bytes"), more than
  // kMaxHandshakeBytes, bytes after the array, no descriptor attached, truncated control data,
  // or anything ParseHandshake rejects; kPeerGone for a hang-up before any byte; recvmsg's own
  // errors as PosixError. After an error, or once complete, the reader reads no more
  // (kFailedPrecondition).
  // REQUIRES: `socket_fd` is a connected Unix stream socket (blocking or not).
  Result<Progress> ReadFrom(int socket_fd);

  // Bytes received so far (for a timeout's message).
  size_t bytes_received() const;

  // The complete handshake. REQUIRES: ReadFrom returned kComplete; call once.
  ReceivedHandshake Take();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// The handler's side, blocking: a HandshakeReader fed until the JSON array is complete. The whole
// handshake must arrive within `timeout`, so this never blocks longer. Errors as
// HandshakeReader::ReadFrom's, and kProtocolError when nothing complete arrived within `timeout`.
// REQUIRES: `socket_fd` is a connected Unix stream socket (blocking or not).
Result<ReceivedHandshake> ReceiveHandshake(int socket_fd, std::chrono::milliseconds timeout,
                                           size_t max_fds = 3, Os* os = nullptr);

}  // namespace guestmem

#endif  // GUESTMEM_HANDSHAKE_H_
