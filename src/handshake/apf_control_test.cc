#include "guestmem/apf_control.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "guestmem/handshake.h"
#include "guestmem/vcpu_fault_frames.h"
#include "testutil/send_raw.h"

namespace guestmem {
namespace {

struct SocketPair {
  SocketPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv), 0);
    vmm.reset(sv[0]);
    handler.reset(sv[1]);
  }
  UniqueFd vmm, handler;
};

int OpenFdCount() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

ino_t Inode(int fd) {
  struct stat st {};
  EXPECT_EQ(fstat(fd, &st), 0);
  return st.st_ino;
}

using testutil::SendRaw;

TEST(ApfControlTest, TheApfSocketIsBesideTheUffdSocket) {
  EXPECT_EQ(ApfSocketPath("/run/fc/uffd.sock"), "/run/fc/apf.socket");
  EXPECT_EQ(ApfSocketPath("/firecracker-uffd.sock"), "/apf.socket");
  EXPECT_EQ(ApfSocketPath("uffd.sock"), "apf.socket");
}

TEST(ApfControlTest, ParsesBothMessagesAndWaitsForTheirEnds) {
  auto parsed = ParseApfControl("no_exitless_apf", 0);
  ASSERT_TRUE(parsed.has_value() && parsed->has_value());
  EXPECT_EQ((*parsed)->bytes, 15u);
  EXPECT_EQ((*parsed)->vcpus, 0u);
  parsed = ParseApfControl("exitless_apf:2", 6);
  ASSERT_TRUE(parsed.has_value() && parsed->has_value());
  EXPECT_EQ((*parsed)->bytes, 14u);
  EXPECT_EQ((*parsed)->vcpus, 2u);
  parsed = ParseApfControl("exitless_apf:64", 192);
  ASSERT_TRUE(parsed.has_value() && parsed->has_value());
  EXPECT_EQ((*parsed)->vcpus, 64u);
  // Prefixes wait; frames after a complete no_exitless_apf are not part of it.
  for (const char* prefix :
       {"n", "no_exitless_ap", "e", "exitless_apf", "exitless_apf:", "exitless_apf:1"}) {
    parsed = ParseApfControl(prefix, 0);
    ASSERT_TRUE(parsed.has_value()) << prefix << ": " << parsed.error().ToString();
    EXPECT_EQ(*parsed, std::nullopt) << prefix;
  }
  parsed = ParseApfControl(std::string("no_exitless_apf") + "\x0c\0\0\0", 0);
  ASSERT_TRUE(parsed.has_value() && parsed->has_value());
  EXPECT_EQ((*parsed)->bytes, 15u);
  EXPECT_TRUE(StartsLikeApfControl('n'));
  EXPECT_TRUE(StartsLikeApfControl('e'));
  for (size_t len = 0; len <= kMaxFaultRequestPayload; ++len) {
    EXPECT_FALSE(StartsLikeApfControl(static_cast<uint8_t>(len)));
  }
}

TEST(ApfControlTest, RefusesWhatFirecrackerNeverSends) {
  struct Case {
    std::string data;
    size_t fds;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"no_exitless_apf", 3, "descriptor(s) came with"},
      {"exitless_apf:2", 3, "came with 3 descriptor(s); 3 per vCPU (6) expected"},
      {"exitless_apf:2", 0, "came with 0 descriptor(s)"},  // a frame's first byte follows
      {"exitless_apf:65", 195, "more than 64 vCPUs"},
      {"exitless_apf:x", 0, "has no vCPU count"},
      {"exitless_apf:1x", 3, "not a decimal number"},
      {"exitless_ap", 3, "cut short"},
      {std::string("\x0c\0\0\0\x04\0", 6), 0, "expected no_exitless_apf or exitless_apf:N"},
      {"NO_EXITLESS_APF", 0, "\"NO_EXITLESS_APF\""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.data);
    std::string data = c.data;
    if (c.data == "exitless_apf:2" && c.fds == 0) data += "\x0c";  // a frame's first byte follows
    auto parsed = ParseApfControl(data, c.fds);
    ASSERT_FALSE(parsed.has_value());
    EXPECT_EQ(parsed.error().code(), ErrorCode::kProtocolError);
    EXPECT_NE(parsed.error().ToString().find(c.expected), std::string::npos)
        << parsed.error().ToString();
  }
}

// The descriptors arrive in vCPU order, the message ends at its boundary (the frame behind it
// stays on the socket), and a peek consumes nothing: peeking twice finds it again.
TEST(ApfControlTest, PeekThenConsumeLeavesTheFramesBehindIt) {
  SocketPair s;
  std::vector<UniqueFd> mine;
  std::vector<int> raw;
  for (int i = 0; i < 6; ++i) {
    mine.emplace_back(eventfd(0, EFD_CLOEXEC));
    raw.push_back(mine.back().get());
  }
  ASSERT_TRUE(SendApfControl(s.vmm.get(), raw));
  const Frame frame = EncodeFaultRequest({.vcpu = 1, .flags = 0x10, .gpa = 0x5000});
  ASSERT_EQ(send(s.vmm.get(), frame.bytes().data(), frame.size(), 0),
            static_cast<ssize_t>(frame.size()));
  const int before = OpenFdCount();
  for (int round = 0; round < 2; ++round) {
    auto peeked = PeekApfControl(s.handler.get());
    ASSERT_TRUE(peeked.has_value()) << peeked.error().ToString();
    ASSERT_TRUE(peeked->has_value());
    EXPECT_EQ((*peeked)->bytes, 14u);
    EXPECT_EQ((*peeked)->vcpus, 2u);
    ASSERT_EQ((*peeked)->fds.size(), 6u);
    for (size_t i = 0; i < 6; ++i) EXPECT_EQ(Inode((*peeked)->fds[i].get()), Inode(raw[i])) << i;
  }
  EXPECT_EQ(OpenFdCount(), before);  // the peeked copies closed with their message
  ASSERT_TRUE(ConsumeApfControl(s.handler.get(), 14));
  EXPECT_EQ(OpenFdCount(), before);  // and those the consuming read brought again
  uint8_t got[64];
  ASSERT_EQ(recv(s.handler.get(), got, sizeof(got), 0), static_cast<ssize_t>(frame.size()));
  EXPECT_EQ(std::vector<uint8_t>(got, got + frame.size()),
            std::vector<uint8_t>(frame.bytes().begin(), frame.bytes().end()));
}

TEST(ApfControlTest, NoExitlessApfIsReadWithoutTheFrameThatFollowsItAtOnce) {
  SocketPair s;
  ASSERT_TRUE(SendApfControl(s.vmm.get(), {}));
  const Frame frame = EncodeFaultRequest({.vcpu = 0, .flags = 0x10, .gpa = 0x7d000});
  ASSERT_EQ(send(s.vmm.get(), frame.bytes().data(), frame.size(), 0),
            static_cast<ssize_t>(frame.size()));
  auto peeked = PeekApfControl(s.handler.get());
  ASSERT_TRUE(peeked.has_value() && peeked->has_value()) << peeked.error().ToString();
  EXPECT_EQ((*peeked)->bytes, 15u);
  EXPECT_EQ((*peeked)->vcpus, 0u);
  ASSERT_TRUE(ConsumeApfControl(s.handler.get(), 15));
  uint8_t got[64];
  ASSERT_EQ(recv(s.handler.get(), got, sizeof(got), 0), static_cast<ssize_t>(frame.size()));
  EXPECT_EQ(got[0], 0x0c);
}

// Message 1 and message 2 back to back on the socket: the handshake reader stops at message 1's
// end and message 2 is read whole after it.
TEST(ApfControlTest, MessageTwoIsNotGluedToMessageOne) {
  SocketPair s;
  UniqueFd uffd_stand_in(eventfd(0, EFD_CLOEXEC));
  const HandshakeRegion region{0x7f0000000000, 1 << 20, 0, 4096, 4096, 0, true};
  int fds[] = {uffd_stand_in.get()};
  ASSERT_TRUE(SendHandshake(s.vmm.get(), std::span(&region, 1), fds));
  ASSERT_TRUE(SendApfControl(s.vmm.get(), {}));
  auto handshake = ReceiveHandshake(s.handler.get(), std::chrono::seconds(5));
  ASSERT_TRUE(handshake.has_value()) << handshake.error().ToString();
  auto peeked = PeekApfControl(s.handler.get());
  ASSERT_TRUE(peeked.has_value() && peeked->has_value()) << peeked.error().ToString();
  EXPECT_EQ((*peeked)->vcpus, 0u);
}

TEST(ApfControlTest, NothingYetThenEofAreTold) {
  SocketPair s;
  auto peeked = PeekApfControl(s.handler.get());
  ASSERT_TRUE(peeked.has_value());
  EXPECT_EQ(*peeked, std::nullopt);
  ASSERT_EQ(send(s.vmm.get(), "exitless", 8, 0), 8);
  peeked = PeekApfControl(s.handler.get());
  ASSERT_TRUE(peeked.has_value());
  EXPECT_EQ(*peeked, std::nullopt);
  s.vmm.reset();
  // Bytes are still there: a prefix, never completed; the hang-up shows once they are consumed.
  char buf[8];
  ASSERT_EQ(recv(s.handler.get(), buf, sizeof(buf), 0), 8);
  peeked = PeekApfControl(s.handler.get());
  ASSERT_FALSE(peeked.has_value());
  EXPECT_EQ(peeked.error().code(), ErrorCode::kPeerGone);
}

TEST(ApfControlTest, TooManyDescriptorsAreRefusedAndClosed) {
  SocketPair s;
  std::vector<UniqueFd> mine;
  std::vector<int> raw;
  for (int i = 0; i < 3 * 65; ++i) {
    mine.emplace_back(eventfd(0, EFD_CLOEXEC));
    raw.push_back(mine.back().get());
  }
  EXPECT_FALSE(SendApfControl(s.vmm.get(), raw).has_value());  // the sender refuses it too
  ASSERT_EQ(SendRaw(s.vmm.get(), "exitless_apf:65", raw), 15);
  const int before = OpenFdCount();
  auto peeked = PeekApfControl(s.handler.get());
  ASSERT_FALSE(peeked.has_value());
  EXPECT_NE(peeked.error().ToString().find("more than 64 vCPUs"), std::string::npos)
      << peeked.error().ToString();
  EXPECT_EQ(OpenFdCount(), before);
}

}  // namespace
}  // namespace guestmem
