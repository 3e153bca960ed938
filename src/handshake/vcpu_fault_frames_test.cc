#include "guestmem/vcpu_fault_frames.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace guestmem {
namespace {

std::vector<uint8_t> Bytes(const std::string& hex) {
  std::vector<uint8_t> out;
  std::istringstream in(hex);
  std::string byte;
  while (in >> byte) out.push_back(static_cast<uint8_t>(std::stoul(byte, nullptr, 16)));
  return out;
}

std::vector<uint8_t> Vec(std::span<const uint8_t> s) { return {s.begin(), s.end()}; }

// The test vectors of Firecracker's protocol description (produced by bitcode 0.6.9's own derive).
TEST(VcpuFaultFramesTest, EncodesTheReferenceVectorsByteForByte) {
  EXPECT_EQ(
      Vec(EncodeFaultRequest({.vcpu = 0, .offset = 0, .flags = 0x10, .gpa = 0x7d000}).bytes()),
      Bytes("0c 00 00 00 04 00 06 00 06 10 01 02 00 d0 07 00"));
  EXPECT_EQ(
      Vec(EncodeFaultReply(
              {.vcpu = 0, .offset = 0, .len = 4096, .flags = 0x10, .gpa = 0x7d000, .zero = false})
              .bytes()),
      Bytes("11 00 00 00 01 04 00 06 00 04 00 10 06 10 01 02 00 d0 07 00 00"));
  EXPECT_EQ(
      Vec(EncodeFaultRequest({.vcpu = 3, .offset = 0, .flags = 0x30, .gpa = uint64_t{1} << 32})
              .bytes()),
      Bytes("10 00 00 00 04 03 06 00 06 30 01 00 00 00 00 00 01 00 00 00"));
  EXPECT_EQ(Vec(EncodeFaultReply({.vcpu = 3,
                                  .offset = 0,
                                  .len = 4096,
                                  .flags = 0x30,
                                  .gpa = uint64_t{1} << 32,
                                  .zero = false})
                    .bytes()),
            Bytes("15 00 00 00 01 04 03 06 00 04 00 10 06 30 01 00 00 00 00 00 01 00 00 00 00"));
  EXPECT_EQ(
      Vec(EncodeFaultRequest({.vcpu = 300, .offset = 0x12345, .flags = 0, .gpa = std::nullopt})
              .payload()),
      Bytes("02 2c 01 02 45 23 01 00 06 00 00"));
  EXPECT_EQ(Vec(EncodeFaultReply({}).payload()), Bytes("00 06 00 06 00 06 00 00 00"));
  EXPECT_EQ(Vec(EncodeFaultReply({.vcpu = 70000,
                                  .offset = 0xff,
                                  .len = 0x10000,
                                  .flags = 0x10,
                                  .gpa = std::nullopt,
                                  .zero = false})
                    .payload()),
            Bytes("01 00 70 11 01 00 06 ff 02 00 00 01 00 06 10 00 00"));
}

TEST(VcpuFaultFramesTest, DecodesTheReferenceVectors) {
  auto request = DecodeFaultRequest(Bytes("04 00 06 00 06 10 01 02 00 d0 07 00"));
  ASSERT_TRUE(request.has_value()) << request.error().ToString();
  EXPECT_EQ(*request, (FaultRequest{.vcpu = 0, .offset = 0, .flags = 0x10, .gpa = 0x7d000}));
  request = DecodeFaultRequest(Bytes("02 2c 01 02 45 23 01 00 06 00 00"));
  ASSERT_TRUE(request.has_value()) << request.error().ToString();
  EXPECT_EQ(*request, (FaultRequest{.vcpu = 300, .offset = 0x12345, .flags = 0, .gpa = {}}));
  auto reply =
      DecodeFaultReply(Bytes("01 04 03 06 00 04 00 10 06 30 01 00 00 00 00 00 01 00 00 00 00"));
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  EXPECT_EQ(*reply, (FaultReply{.vcpu = 3,
                                .offset = 0,
                                .len = 4096,
                                .flags = 0x30,
                                .gpa = uint64_t{1} << 32,
                                .zero = false}));
  reply = DecodeFaultReply(Bytes("01 00 70 11 01 00 06 ff 02 00 00 01 00 06 10 00 00"));
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  EXPECT_EQ(reply->vcpu, 70000u);
  EXPECT_EQ(reply->len, 0x10000u);
  EXPECT_EQ(reply->gpa, std::nullopt);
  reply = DecodeFaultReply(Bytes("00 06 00 06 00 06 00 00 00"));
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  EXPECT_EQ(*reply, FaultReply{});
}

// What bitcode's decoder accepts besides the minimal forms: wider widths, the odd headers (a
// full-width minimum first, added with wrap-around), any tag or bool byte by its bit 0.
TEST(VcpuFaultFramesTest, DecodesTheWiderFormsBitcodeAccepts) {
  // u32 0 in four bytes, u64 offsets in eight, flags 0x10 in two.
  auto request = DecodeFaultRequest(
      Bytes("00 00 00 00 00  00 00 00 00 00 00 00 00 00  04 10 00  01 00 00 d0 07 00 00 00 00 00"));
  ASSERT_TRUE(request.has_value()) << request.error().ToString();
  EXPECT_EQ(*request, (FaultRequest{.vcpu = 0, .offset = 0, .flags = 0x10, .gpa = 0x7d000}));
  // Odd headers: u32 H=1 (min u32, then u16), u64 H=3 (min u64, then u16), H=5 (then u8), and a
  // minimum that wraps: u64 max + 2 = 1.
  request =
      DecodeFaultRequest(Bytes("01 00 00 01 00 05 00 "
                               "03 00 10 00 00 00 00 00 00 34 12 "
                               "05 ff ff ff ff ff ff ff ff 02 "
                               "01 03 01 00 00 00 00 00 00 00 00 f0"));
  ASSERT_TRUE(request.has_value()) << request.error().ToString();
  EXPECT_EQ(request->vcpu, 0x10005u);
  EXPECT_EQ(request->offset, 0x1000u + 0x1234u);
  EXPECT_EQ(request->flags, 1u);
  EXPECT_EQ(request->gpa, 0xf001u);
  // A tag of 0xfe is None, 0x03 is Some; a bool of 0xff is true.
  auto reply = DecodeFaultReply(Bytes("fe 06 00 06 00 06 00 03 04 01 02 ff"));
  ASSERT_TRUE(reply.has_value()) << reply.error().ToString();
  EXPECT_EQ(reply->vcpu, std::nullopt);
  EXPECT_EQ(reply->gpa, 0x0201u);
  EXPECT_TRUE(reply->zero);
  // u32 wraps too: min 0xffffffff + 1.
  request = DecodeFaultRequest(Bytes("03 ff ff ff ff 01 06 00 06 00 00"));
  ASSERT_TRUE(request.has_value()) << request.error().ToString();
  EXPECT_EQ(request->vcpu, 0u);
}

TEST(VcpuFaultFramesTest, RefusesMalformedPayloadsNamingTheField) {
  struct Case {
    std::string bytes;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"", "FaultRequest.vcpu: the payload ends"},
      {"04", "FaultRequest.vcpu: the payload ends inside it (1 bytes needed, 0 left)"},
      {"05 00", "FaultRequest.vcpu: integer header 0x5 names no width of a u32"},
      {"04 00 07 00", "FaultRequest.offset: integer header 0x7 names no width of a u64"},
      {"04 00 06 00 06 10", "FaultRequest.gpa: the payload ends"},
      {"04 00 06 00 06 10 01 00 00 00 00", "FaultRequest.gpa: the payload ends inside it"},
      {"04 00 06 00 06 10 00 00", "FaultRequest: 1 trailing byte(s)"},
      {"04 00 06 00 06 10 01 06 00 ff ff", "FaultRequest: 2 trailing byte(s)"},
      {"7b 22 76 63 70 75 22 3a 30 7d", "FaultRequest.vcpu: integer header 0x7b"},  // {"vcpu":0}
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.bytes);
    auto decoded = DecodeFaultRequest(Bytes(c.bytes));
    ASSERT_FALSE(decoded.has_value());
    EXPECT_EQ(decoded.error().code(), ErrorCode::kProtocolError);
    EXPECT_NE(decoded.error().ToString().find(c.expected), std::string::npos)
        << decoded.error().ToString();
  }
  auto reply = DecodeFaultReply(Bytes("01 04 00 06 00 04 00 10 06 10 01 02 00 d0 07 00"));
  ASSERT_FALSE(reply.has_value());
  EXPECT_NE(reply.error().ToString().find("FaultReply.zero"), std::string::npos);
}

// Every proper prefix of a valid payload is refused; so is the payload with a byte appended.
TEST(VcpuFaultFramesTest, EveryTruncationAndEveryExtensionIsRefused) {
  const Frame request =
      EncodeFaultRequest({.vcpu = 70000, .offset = 1, .flags = 0x30, .gpa = uint64_t{1} << 40});
  const Frame reply = EncodeFaultReply({.vcpu = 7,
                                        .offset = 0x1234567,
                                        .len = 4096,
                                        .flags = 0x10,
                                        .gpa = 0xfffff000,
                                        .zero = true});
  for (size_t n = 0; n < request.payload().size(); ++n) {
    EXPECT_FALSE(DecodeFaultRequest(request.payload().first(n)).has_value()) << n;
  }
  for (size_t n = 0; n < reply.payload().size(); ++n) {
    EXPECT_FALSE(DecodeFaultReply(reply.payload().first(n)).has_value()) << n;
  }
  std::vector<uint8_t> longer = Vec(request.payload());
  longer.push_back(0);
  EXPECT_FALSE(DecodeFaultRequest(longer).has_value());
  longer = Vec(reply.payload());
  longer.push_back(0);
  EXPECT_FALSE(DecodeFaultReply(longer).has_value());
}

// Values at every width boundary, and random ones: decode(encode(x)) == x, the frame's header
// says its payload's length, and the payload is the minimal form (at most the sizes bitcode's
// encoder produces: 7..33 bytes for a request, 9..44 for a reply).
uint64_t Interesting(std::mt19937_64& rng, uint64_t max) {
  static const uint64_t kEdges[] = {0,       1,          0xff,        0x100,      0xffff,
                                    0x10000, 0xffffffff, 0x100000000, UINT64_MAX, 0x7d000};
  uint64_t v = (rng() % 3 == 0) ? kEdges[rng() % std::size(kEdges)] : rng() >> (rng() % 64);
  return v & max;
}

TEST(VcpuFaultFramesTest, RoundTripsAtEveryWidthAndRandomly) {
  std::mt19937_64 rng(12);
  for (int i = 0; i < 20000; ++i) {
    FaultRequest request;
    request.vcpu = static_cast<uint32_t>(Interesting(rng, UINT32_MAX));
    request.offset = Interesting(rng, UINT64_MAX);
    request.flags = Interesting(rng, UINT64_MAX);
    if (rng() % 2) request.gpa = Interesting(rng, UINT64_MAX);
    const Frame frame = EncodeFaultRequest(request);
    ASSERT_GE(frame.payload().size(), 7u);
    ASSERT_LE(frame.payload().size(), 33u);
    auto size = FrameSize(frame.bytes(), kMaxFaultRequestPayload);
    ASSERT_TRUE(size.has_value() && size->has_value());
    ASSERT_EQ(**size, frame.size());
    auto decoded = DecodeFaultRequest(frame.payload());
    ASSERT_TRUE(decoded.has_value()) << decoded.error().ToString();
    ASSERT_EQ(*decoded, request) << Describe(request);

    FaultReply reply;
    if (rng() % 2) reply.vcpu = static_cast<uint32_t>(Interesting(rng, UINT32_MAX));
    reply.offset = Interesting(rng, UINT64_MAX);
    reply.len = Interesting(rng, UINT64_MAX);
    reply.flags = Interesting(rng, UINT64_MAX);
    if (rng() % 2) reply.gpa = Interesting(rng, UINT64_MAX);
    reply.zero = rng() % 2;
    const Frame reply_frame = EncodeFaultReply(reply);
    ASSERT_GE(reply_frame.payload().size(), 9u);
    ASSERT_LE(reply_frame.payload().size(), 44u);
    auto decoded_reply = DecodeFaultReply(reply_frame.payload());
    ASSERT_TRUE(decoded_reply.has_value()) << decoded_reply.error().ToString();
    ASSERT_EQ(*decoded_reply, reply) << Describe(reply);
  }
}

// A decoded random payload re-encodes to something that decodes to the same value: the decoder
// and the encoder agree on everything the decoder accepts.
TEST(VcpuFaultFramesTest, WhatDecodesReencodesToTheSameValue) {
  std::mt19937_64 rng(7);
  int accepted = 0;
  for (int i = 0; i < 200000; ++i) {
    std::vector<uint8_t> payload(rng() % (kMaxFaultReplyPayload + 1));
    for (uint8_t& b : payload) {
      // Mostly small bytes, so that headers and tags are often valid.
      b = static_cast<uint8_t>(rng() % 4 == 0 ? rng() : rng() % 8);
    }
    if (auto request = DecodeFaultRequest(payload)) {
      ++accepted;
      ASSERT_LE(payload.size(), kMaxFaultRequestPayload);
      auto again = DecodeFaultRequest(EncodeFaultRequest(*request).payload());
      ASSERT_TRUE(again.has_value());
      ASSERT_EQ(*again, *request);
    }
    if (auto reply = DecodeFaultReply(payload)) {
      ++accepted;
      ASSERT_LE(payload.size(), kMaxFaultReplyPayload);
      auto again = DecodeFaultReply(EncodeFaultReply(*reply).payload());
      ASSERT_TRUE(again.has_value());
      ASSERT_EQ(*again, *reply);
    }
  }
  EXPECT_GT(accepted, 100);  // the property was exercised
}

// The widest form of every field is the longest payload accepted.
TEST(VcpuFaultFramesTest, TheLongestAcceptedPayloadsAreTheAnnouncedMaxima) {
  const std::string u32_widest = "01 ff ff ff ff ff ff ";                    // 7 bytes
  const std::string u64_widest = "01 ff ff ff ff ff ff ff ff ff ff ff ff ";  // 13 bytes
  const auto request = Bytes(u32_widest + u64_widest + u64_widest + "01 " + u64_widest);
  ASSERT_EQ(request.size(), kMaxFaultRequestPayload);
  EXPECT_TRUE(DecodeFaultRequest(request).has_value());
  const auto reply =
      Bytes("01 " + u32_widest + u64_widest + u64_widest + u64_widest + "01 " + u64_widest + "00");
  ASSERT_EQ(reply.size(), kMaxFaultReplyPayload);
  EXPECT_TRUE(DecodeFaultReply(reply).has_value());
}

TEST(VcpuFaultFramesTest, FrameSizeWaitsForWholeFramesAndRefusesLongOnesAtOnce) {
  const Frame frame = EncodeFaultRequest({.vcpu = 1, .flags = 0x10, .gpa = 0x1000});
  for (size_t n = 0; n < frame.size(); ++n) {
    auto size = FrameSize(frame.bytes().first(n), kMaxFaultRequestPayload);
    ASSERT_TRUE(size.has_value());
    EXPECT_EQ(*size, std::nullopt) << n;
  }
  std::vector<uint8_t> two = Vec(frame.bytes());
  two.insert(two.end(), frame.bytes().begin(), frame.bytes().end());
  auto size = FrameSize(two, kMaxFaultRequestPayload);
  ASSERT_TRUE(size.has_value());
  EXPECT_EQ(*size, frame.size());
  // A header of 48 bytes or 4 GiB: refused from its four bytes alone.
  for (const char* header : {"30 00 00 00", "ff ff ff ff", "00 00 00 01"}) {
    auto refused = FrameSize(Bytes(header), kMaxFaultRequestPayload);
    ASSERT_FALSE(refused.has_value()) << header;
    EXPECT_EQ(refused.error().code(), ErrorCode::kProtocolError);
  }
  auto largest = FrameSize(Bytes("2f 00 00 00"), kMaxFaultRequestPayload);
  ASSERT_TRUE(largest.has_value());
  EXPECT_EQ(*largest, std::nullopt);  // 47 bytes may still come
}

TEST(VcpuFaultFramesTest, TheReplyEchoesTheRequest) {
  const FaultRequest request{.vcpu = 5, .offset = 0, .flags = 0x30, .gpa = 0xabc000};
  EXPECT_EQ(
      ReplyTo(request),
      (FaultReply{
          .vcpu = 5, .offset = 0, .len = 4096, .flags = 0x30, .gpa = 0xabc000, .zero = false}));
  EXPECT_EQ(Describe(request), "FaultRequest{vcpu 5, offset 0x0, flags 0x30, gpa 0xabc000}");
  EXPECT_EQ(Describe(FaultReply{}),
            "FaultReply{vcpu None, offset 0x0, len 0x0, flags 0x0, gpa None, zero false}");
}

}  // namespace
}  // namespace guestmem
