// Fuzzes the reading of secret-hiding vCPU fault frames (guestmem/vcpu_fault_frames.h) the way the
// daemon reads a Uffd or APF socket: the input is the byte stream, cut into frames by FrameSize
// and each payload decoded as a FaultRequest (what the daemon reads) and as a FaultReply (what
// vmm-sim reads). Beyond "no crash, no leak, no undefined behaviour", it checks:
//   - FrameSize never announces a frame longer than header + limit, nor one past what it was
//     shown; with the request limit the daemon uses it agrees with the reply limit on every frame
//     short enough for both; errors are protocol errors;
//   - a decoded message survives encoding and decoding unchanged, and its encoding (the minimal
//     form Rust's derive writes) is never longer than the payload it came from, and encodes to
//     itself again;
//   - the encoded frame's header announces exactly its payload;
//   - a decode error is a protocol error.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "fuzz_check.h"
#include "guestmem/vcpu_fault_frames.h"

namespace guestmem {
namespace {

uint32_t HeaderOf(const Frame& frame) {
  uint32_t length = 0;
  for (size_t i = 0; i < kFrameHeaderBytes; ++i) {
    length |= static_cast<uint32_t>(frame.bytes()[i]) << (8 * i);
  }
  return length;
}

bool SameBytes(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

template <typename Message, typename Decode, typename Encode>
void CheckMessage(std::span<const uint8_t> payload, Decode decode, Encode encode) {
  Result<Message> decoded = decode(payload);
  if (!decoded) {
    Check(decoded.error().code() == ErrorCode::kProtocolError,
          "a decode error is a protocol error");
    return;
  }
  (void)Describe(*decoded);
  const Frame frame = encode(*decoded);
  Check(HeaderOf(frame) == frame.payload().size(), "the header announces the payload");
  Check(frame.payload().size() <= payload.size(), "the minimal encoding is never longer");
  Result<Message> again = decode(frame.payload());
  Check(again.has_value(), "an encoded message decodes");
  Check(*again == *decoded, "the round trip keeps every field");
  Check(SameBytes(encode(*again).bytes(), frame.bytes()), "the encoding is canonical");
}

void FuzzOne(std::span<const uint8_t> stream) {
  while (!stream.empty()) {
    Result<std::optional<size_t>> size = FrameSize(stream, kMaxFaultReplyPayload);
    Result<std::optional<size_t>> request_size = FrameSize(stream, kMaxFaultRequestPayload);
    if (!size) {
      Check(size.error().code() == ErrorCode::kProtocolError,
            "a framing error is a protocol error");
      Check(!request_size.has_value(), "a frame too long for replies is too long for requests");
      return;
    }
    if (!size->has_value()) return;  // incomplete: the daemon waits for more
    const size_t whole = **size;
    Check(whole >= kFrameHeaderBytes && whole <= kFrameHeaderBytes + kMaxFaultReplyPayload,
          "a frame fits the limit");
    Check(whole <= stream.size(), "a frame lies within what was shown");
    if (whole <= kFrameHeaderBytes + kMaxFaultRequestPayload) {
      Check(request_size.has_value() && *request_size == *size, "both limits agree");
    } else {
      Check(!request_size.has_value() && request_size.error().code() == ErrorCode::kProtocolError,
            "a frame beyond the request limit is refused");
    }
    const std::span<const uint8_t> payload =
        stream.subspan(kFrameHeaderBytes, whole - kFrameHeaderBytes);
    CheckMessage<FaultRequest>(payload, DecodeFaultRequest, EncodeFaultRequest);
    CheckMessage<FaultReply>(payload, DecodeFaultReply, EncodeFaultReply);
    stream = stream.subspan(whole);
  }
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::FuzzOne(std::span<const uint8_t>(data, size));
  return 0;
}
