// vCPU fault frames: the messages Firecracker's secret-hiding restore exchanges with its page-fault
// handler after the handshake, on the Uffd socket and on the optional APF socket.
//
// A guest (stage-2) fault on a page whose userfault bit is set exits to Firecracker, which asks the
// handler for the page with a FaultRequest; the handler puts the page's content into the guest
// memory file, clears the bit and answers with a FaultReply. Each message is a frame:
//
//   u32 little-endian payload length | payload: the struct in bitcode 0.6.9 (derive encoding)
//
// bitcode encodes one top-level struct as its fields back to back, in declaration order:
//   unsigned integer  a header byte H, then the value little-endian in the width H names. The
//                     encoder takes the smallest width that holds the value (u64: 0x06 + 1 byte,
//                     0x04 + 2, 0x02 + 4, 0x00 + 8; u32: 0x04 + 1, 0x02 + 2, 0x00 + 4). A decoder
//                     also accepts wider forms and the odd headers, which first give a
//                     full-width minimum added to the value;
//   Option<T>         a tag byte (bit 0: Some), then T for Some;
//   bool              one byte (bit 0).
// A payload must be consumed exactly: trailing bytes are an error, as they are to Firecracker.
//
//   FaultRequest = u32 vcpu | u64 offset | u64 flags | Option<u64> gpa
//   FaultReply   = Option<u32> vcpu | u64 offset | u64 len | u64 flags | Option<u64> gpa | bool
//   zero
//
// The encoders produce exactly what Rust's #[derive(Encode)] does (the minimal forms), so that a
// frame from here is byte for byte one from Firecracker's side; a frame never needs an allocation.
//
// Thread safety: free functions and value types; no shared state.
#ifndef GUESTMEM_VCPU_FAULT_FRAMES_H_
#define GUESTMEM_VCPU_FAULT_FRAMES_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "guestmem/result.h"

namespace guestmem {

// Firecracker -> handler: a vCPU waits for this page.
struct FaultRequest {
  uint32_t vcpu = 0;
  uint64_t offset = 0;  // always 0 from Firecracker: the page is named by gpa
  uint64_t flags = 0;   // kvm_run.memory_fault.flags: 0x10 (USERFAULT), 0x30 with APF
  std::optional<uint64_t> gpa;

  friend bool operator==(const FaultRequest&, const FaultRequest&) = default;
};

// Handler -> Firecracker: the page is in the guest memory file and its bit is clear.
struct FaultReply {
  std::optional<uint32_t> vcpu;  // Firecracker wakes this vCPU; None would panic it
  uint64_t offset = 0;
  uint64_t len = 0;
  uint64_t flags = 0;
  std::optional<uint64_t> gpa;  // the APF socket's reply must carry it
  bool zero = false;

  friend bool operator==(const FaultReply&, const FaultReply&) = default;
};

// kvm_run.memory_fault.flags as Firecracker forwards them.
inline constexpr uint64_t kMemoryFaultUserfault = 0x10;
inline constexpr uint64_t kMemoryFaultApf = 0x20;

inline constexpr size_t kFrameHeaderBytes = 4;
// The longest payloads a decoder accepts: every field in its widest accepted form (an integer with
// an odd header: 1 + full-width minimum + value; an option's tag before it).
inline constexpr size_t kMaxFaultRequestPayload = 7 + 13 + 13 + 14;
inline constexpr size_t kMaxFaultReplyPayload = 8 + 13 + 13 + 13 + 14 + 1;

// One encoded frame (header and payload), held inline.
class Frame {
 public:
  std::span<const uint8_t> bytes() const { return {bytes_.data(), size_}; }
  size_t size() const { return size_; }
  // The payload after the header.
  std::span<const uint8_t> payload() const { return bytes().subspan(kFrameHeaderBytes); }

 private:
  friend class FrameWriter;
  std::array<uint8_t, kFrameHeaderBytes + kMaxFaultReplyPayload> bytes_{};
  size_t size_ = 0;
};

// The reply Firecracker's example handler sends for `request`, which gmem sends too:
// {Some(vcpu), request.offset, len 4096, request.flags, request.gpa, zero false}.
FaultReply ReplyTo(const FaultRequest& request);

Frame EncodeFaultRequest(const FaultRequest& request);
Frame EncodeFaultReply(const FaultReply& reply);

// Decode a payload (without its header). ERRORS: kProtocolError naming the field and what is wrong:
// the payload ends inside a field, an integer header bitcode does not define, trailing bytes.
Result<FaultRequest> DecodeFaultRequest(std::span<const uint8_t> payload);
Result<FaultReply> DecodeFaultReply(std::span<const uint8_t> payload);

// The size (header included) of the frame at the front of `data`, or std::nullopt while it is
// incomplete. A header announcing a payload longer than `max_payload` is refused at once (before
// its bytes arrive): kProtocolError. So a reader holds at most kFrameHeaderBytes + max_payload
// bytes of one frame, whatever the peer announces.
Result<std::optional<size_t>> FrameSize(std::span<const uint8_t> data, size_t max_payload);

// "FaultRequest{vcpu 2, offset 0x0, flags 0x10, gpa 0x7d000}" for log lines.
std::string Describe(const FaultRequest& request);
std::string Describe(const FaultReply& reply);

}  // namespace guestmem

#endif  // GUESTMEM_VCPU_FAULT_FRAMES_H_
