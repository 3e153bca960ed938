#include "guestmem/handshake.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>

#include "base/fault_injection_os.h"
#include "testutil/send_raw.h"

namespace guestmem {
namespace {

using namespace std::chrono_literals;

HandshakeRegion Region(uint64_t addr, uint64_t size, uint64_t offset, uint64_t page = 4096) {
  return HandshakeRegion{addr, size, offset, page, page, std::nullopt, std::nullopt};
}

struct SocketPair {
  SocketPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    vmm.reset(sv[0]);
    handler.reset(sv[1]);
  }
  UniqueFd vmm, handler;
};

UniqueFd Memfd() { return UniqueFd(memfd_create("handshake-test", MFD_CLOEXEC)); }

ino_t Inode(int fd) {
  struct stat st {};
  EXPECT_EQ(fstat(fd, &st), 0) << "fd " << fd << " is not open";
  return st.st_ino;
}

int OpenFdCount() {
  int n = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++n;
  }
  return n;
}

using testutil::SendRaw;

TEST(HandshakeTest, EncodesExactlyAsFirecracker) {
  std::vector<HandshakeRegion> regions = {Region(140121337511936, 3221225472, 0)};
  EXPECT_EQ(EncodeHandshake(regions),
            R"([{"base_host_virt_addr":140121337511936,"size":3221225472,"offset":0,)"
            R"("page_size":4096,"page_size_kib":4096}])");
  regions.push_back(Region(140124558737408, 1 << 30, 3221225472, 2 << 20));
  regions[0].page_size_kib.reset();  // encoded from page_size when absent
  EXPECT_EQ(EncodeHandshake(regions),
            R"([{"base_host_virt_addr":140121337511936,"size":3221225472,"offset":0,)"
            R"("page_size":4096,"page_size_kib":4096},)"
            R"({"base_host_virt_addr":140124558737408,"size":1073741824,"offset":3221225472,)"
            R"("page_size":2097152,"page_size_kib":2097152}])");
  regions.resize(1);
  regions[0].gpa_start = 0;
  regions[0].is_guest_memfd = true;
  EXPECT_EQ(EncodeHandshake(regions),
            R"([{"base_host_virt_addr":140121337511936,"size":3221225472,"offset":0,)"
            R"("page_size":4096,"page_size_kib":4096,"gpa_start":0,"is_guest_memfd":true}])");
}

TEST(HandshakeTest, RoundTripsOneToManyRegionsWithGapsAndHugePages) {
  for (size_t count : {1, 2, 7}) {
    SCOPED_TRACE(count);
    SocketPair s;
    std::vector<HandshakeRegion> regions;
    uint64_t offset = 0;
    for (size_t i = 0; i < count; ++i) {
      const uint64_t page = i % 2 == 0 ? 4096 : 2 << 20;
      const uint64_t size = (i + 1) * (4 << 20);
      // 1 GiB apart in the host: gaps, as for x86's MMIO hole.
      regions.push_back(Region(0x7f0000000000 + i * (1ull << 30), size, offset, page));
      offset += size;
    }
    UniqueFd uffd_stand_in = Memfd();
    int fds[] = {uffd_stand_in.get()};
    ASSERT_TRUE(SendHandshake(s.vmm.get(), regions, fds));
    auto got = ReceiveHandshake(s.handler.get(), 2s);
    ASSERT_TRUE(got.has_value()) << got.error().ToString();
    ASSERT_EQ(got->regions.size(), count);
    for (size_t i = 0; i < count; ++i) {
      EXPECT_EQ(got->regions[i].base_host_virt_addr, regions[i].base_host_virt_addr);
      EXPECT_EQ(got->regions[i].size, regions[i].size);
      EXPECT_EQ(got->regions[i].offset, regions[i].offset);
      EXPECT_EQ(got->regions[i].page_size, regions[i].page_size);
      EXPECT_EQ(got->regions[i].page_size_kib, regions[i].page_size);
      EXPECT_FALSE(got->regions[i].gpa_start.has_value());
      EXPECT_FALSE(got->regions[i].is_guest_memfd.has_value());
    }
    EXPECT_EQ(got->raw_json, EncodeHandshake(regions));
    ASSERT_EQ(got->fds.size(), 1u);
    EXPECT_NE(got->fds[0].get(), uffd_stand_in.get());
    EXPECT_EQ(Inode(got->fds[0].get()), Inode(uffd_stand_in.get()));  // the same file
    EXPECT_TRUE(fcntl(got->fds[0].get(), F_GETFD) & FD_CLOEXEC);
    EXPECT_TRUE(ValidateHandshake(got->regions, offset));
  }
}

TEST(HandshakeTest, SecretHidingVariantWithThreeDescriptors) {
  SocketPair s;
  HandshakeRegion r = Region(0x7f0000000000, 1 << 20, 0);
  r.gpa_start = 0x100000000;
  r.is_guest_memfd = true;
  UniqueFd a = Memfd(), b = Memfd(), c = Memfd();
  int fds[] = {a.get(), b.get(), c.get()};
  ASSERT_TRUE(SendHandshake(s.vmm.get(), std::span(&r, 1), fds));
  auto got = ReceiveHandshake(s.handler.get(), 2s);
  ASSERT_TRUE(got.has_value()) << got.error().ToString();
  ASSERT_EQ(got->fds.size(), 3u);
  // Real, distinct files, in the order sent.
  EXPECT_EQ(Inode(got->fds[0].get()), Inode(a.get()));
  EXPECT_EQ(Inode(got->fds[1].get()), Inode(b.get()));
  EXPECT_EQ(Inode(got->fds[2].get()), Inode(c.get()));
  EXPECT_EQ(std::set<ino_t>({Inode(a.get()), Inode(b.get()), Inode(c.get())}).size(), 3u);
  EXPECT_EQ(got->regions[0].is_guest_memfd, true);
  EXPECT_EQ(got->regions[0].gpa_start, 0x100000000u);
}

// Sends a one-region handshake with `count` memfds attached, then receives it with `max_fds`.
// Stores the sent files in `files` and how many descriptors receiving added in `added`.
Result<ReceivedHandshake> SendManyFds(int count, size_t max_fds, std::vector<UniqueFd>& files,
                                      int& added) {
  SocketPair s;
  std::vector<int> raw;
  for (int i = 0; i < count; ++i) {
    files.push_back(Memfd());
    raw.push_back(files.back().get());
  }
  const HandshakeRegion r = Region(0x7f0000000000, 1 << 20, 0);
  EXPECT_TRUE(SendHandshake(s.vmm.get(), std::span(&r, 1), raw));
  const int before = OpenFdCount();
  auto got = ReceiveHandshake(s.handler.get(), 2s, max_fds);
  added = OpenFdCount() - before;
  return got;
}

TEST(HandshakeTest, DescriptorsBeyondMaxFdsAreClosed) {
  std::vector<UniqueFd> files;
  int added = 0;
  auto got = SendManyFds(5, /*max_fds=*/3, files, added);
  ASSERT_TRUE(got.has_value()) << got.error().ToString();
  ASSERT_EQ(got->fds.size(), 3u);
  EXPECT_EQ(Inode(got->fds[2].get()), Inode(files[2].get()));
  EXPECT_EQ(added, 3);  // the other two did not leak
}

TEST(HandshakeTest, TooManyDescriptorsForTheControlBufferIsAnError) {
  std::vector<UniqueFd> files;
  int added = 0;
  auto got = SendManyFds(40, /*max_fds=*/3, files, added);
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error().code(), ErrorCode::kProtocolError);
  EXPECT_NE(got.error().context().find("control data truncated"), std::string::npos)
      << got.error().ToString();
  EXPECT_EQ(added, 0);
}

TEST(HandshakeTest, MessageSplitAcrossSeveralWritesWithTheDescriptorFirst) {
  SocketPair s;
  std::vector<HandshakeRegion> regions;
  for (uint64_t i = 0; i < 1000; ++i) {
    regions.push_back(Region(0x7f0000000000 + i * 0x200000, 4096, i * 4096));
  }
  // Strings with brackets must not end the array early: an unknown field, ignored.
  std::string json = EncodeHandshake(regions);
  json.insert(2, R"("note":"]}] \"]",)");
  ASSERT_GT(json.size(), 70000u);  // longer than one read of 64 KiB
  UniqueFd fd = Memfd();
  std::thread vmm([&] {
    const size_t first = 100;
    int fds[] = {fd.get()};
    EXPECT_EQ(SendRaw(s.vmm.get(), std::string_view(json).substr(0, first), fds),
              static_cast<ssize_t>(first));
    for (size_t at = first; at < json.size(); at += 5000) {
      std::this_thread::sleep_for(1ms);
      const size_t n = std::min<size_t>(5000, json.size() - at);
      EXPECT_EQ(write(s.vmm.get(), json.data() + at, n), static_cast<ssize_t>(n));
    }
  });
  auto got = ReceiveHandshake(s.handler.get(), 5s);
  vmm.join();
  ASSERT_TRUE(got.has_value()) << got.error().ToString();
  ASSERT_EQ(got->regions.size(), 1000u);
  EXPECT_EQ(got->regions[999].offset, 999u * 4096);
  EXPECT_EQ(got->raw_json, json);
  ASSERT_EQ(got->fds.size(), 1u);
  EXPECT_EQ(Inode(got->fds[0].get()), Inode(fd.get()));
}

// Sends `bytes` (with one memfd unless `with_fd` is false) from a thread, closes the sending end
// if `close_after`, and returns what the handler side receives.
Result<ReceivedHandshake> Feed(const std::string& bytes, bool with_fd, bool close_after,
                               std::chrono::milliseconds timeout = 1000ms) {
  SocketPair s;
  UniqueFd fd = Memfd();
  std::thread vmm([&] {
    if (!bytes.empty()) {
      int fds[] = {fd.get()};
      // A huge message may be cut short when the handler stops reading and closes.
      SendRaw(s.vmm.get(), bytes, with_fd ? std::span<const int>(fds) : std::span<const int>());
    }
    if (close_after) shutdown(s.vmm.get(), SHUT_WR);
  });
  auto got = ReceiveHandshake(s.handler.get(), timeout);
  s.handler.reset();  // unblocks a sender still writing
  vmm.join();
  return got;
}

void ExpectProtocolError(const std::string& bytes, const std::string& fragment, bool with_fd = true,
                         bool close_after = true) {
  auto got = Feed(bytes, with_fd, close_after);
  ASSERT_FALSE(got.has_value()) << bytes.substr(0, 100);
  EXPECT_EQ(got.error().code(), ErrorCode::kProtocolError) << got.error().ToString();
  EXPECT_NE(got.error().context().find(fragment), std::string::npos)
      << "wanted '" << fragment << "' in: " << got.error().ToString();
}

TEST(HandshakeTest, MalformedMessagesAreNamed) {
  ExpectProtocolError("this is not json", "not valid JSON");
  ExpectProtocolError("[1,}", "at line 1, column 4");  // the parser's position
  ExpectProtocolError(R"({"size":1})", "must be a JSON array, not a JSON object");
  ExpectProtocolError("[]", "no regions");
  ExpectProtocolError("[1]", "region 0 is not a JSON object: 1");
  ExpectProtocolError(R"([[[[[[]]]]]])", "region 0 is not a JSON object: a JSON array");
  ExpectProtocolError(R"([{"size":4096,"offset":0,"page_size":4096}])",
                      "region 0: missing field \"base_host_virt_addr\"");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"offset":0,"page_size":4096}])",
                      "missing field \"size\"");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4096,"page_size":4096}])",
                      "missing field \"offset\"");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4096,"offset":0}])",
                      "missing field \"page_size\"");
  ExpectProtocolError(R"([{"base_host_virt_addr":"x","size":4096,"offset":0,"page_size":4096}])",
                      "\"base_host_virt_addr\" must be a non-negative integer, not \"x\"");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":null,"offset":0,"page_size":4096}])",
                      "\"size\" must be a non-negative integer, not null");
  ExpectProtocolError(R"([{"base_host_virt_addr":-4096,"size":4096,"offset":0,"page_size":4096}])",
                      "\"base_host_virt_addr\" is negative (-4096)");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4.5,"offset":0,"page_size":4096}])",
                      "\"size\" must be a non-negative integer, not 4.5");
  ExpectProtocolError(
      R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}])",
      "region 0: page_size_kib 4 disagrees with page_size 4096");
  ExpectProtocolError(
      R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"is_guest_memfd":1}])",
      "\"is_guest_memfd\" must be a boolean");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096},)"
                      R"({"base_host_virt_addr":4096,"size":4096,"offset":4096,"page_size":-1}])",
                      "region 1: \"page_size\" is negative");
  ExpectProtocolError(R"([{"base_host_virt_addr":4096,"size":4096)",
                      "truncated handshake after 40 bytes");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096}] x)",
                      "unexpected bytes after the JSON array");
  ExpectProtocolError(R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096}])",
                      "no userfaultfd descriptor", /*with_fd=*/false);
  ExpectProtocolError(std::string(3 << 20, '['), "larger than 1048576 bytes");
}

// Regression: the stream scanner refused a byte order mark that the JSON parser skips, and the
// parser's success was then taken for an error (bad_variant_access).
TEST(HandshakeTest, AByteOrderMarkOrOtherNonJsonStartIsAProtocolError) {
  const std::string good = R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096}])";
  ExpectProtocolError("\xEF\xBB\xBF" + good, "UTF-8 byte order mark");
  ExpectProtocolError("\xEF\xBB\xBF" + good, "UTF-8 byte order mark", true, false);
  ExpectProtocolError("\v" + good, "not valid JSON");
  ExpectProtocolError("\f" + good, "not valid JSON");
  ExpectProtocolError(std::string("\0", 1) + good, "not valid JSON");
  ExpectProtocolError(" \t\r\n\xEF\xBB\xBF" + good, "not valid JSON");
  auto parsed = ParseHandshake("\xEF\xBB\xBF" + good);
  ASSERT_FALSE(parsed.has_value());
  EXPECT_EQ(parsed.error().code(), ErrorCode::kProtocolError);
  EXPECT_NE(parsed.error().context().find("byte order mark"), std::string::npos)
      << parsed.error().ToString();
  // JSON's own whitespace before the array is fine for both.
  auto spaced = Feed(" \t\r\n" + good, true, true);
  EXPECT_TRUE(spaced.has_value()) << spaced.error().ToString();
}

TEST(HandshakeTest, ParseAcceptsOlderAndExtendedForms) {
  // Older Firecracker: only page_size_kib (in bytes). Unknown fields are ignored.
  auto old = ParseHandshake(
      R"([{"base_host_virt_addr":8192,"size":4096,"offset":0,"page_size_kib":2097152,"x":[1]}])");
  ASSERT_TRUE(old.has_value()) << old.error().ToString();
  EXPECT_EQ((*old)[0].page_size, 2097152u);
  EXPECT_EQ((*old)[0].base_host_virt_addr, 8192u);
  // Surrounding whitespace is fine, and the largest addresses survive.
  auto big = ParseHandshake(
      " [{\"base_host_virt_addr\":18446744073709547520,\"size\":4096,\"offset\":0,"
      "\"page_size\":4096}]\n");
  ASSERT_TRUE(big.has_value()) << big.error().ToString();
  EXPECT_EQ((*big)[0].base_host_virt_addr, 18446744073709547520u);
  EXPECT_FALSE((*big)[0].page_size_kib.has_value());
}

TEST(HandshakeTest, SilentTricklingAndVanishingPeers) {
  {
    const auto start = std::chrono::steady_clock::now();
    auto silent = Feed("", true, /*close_after=*/false, 100ms);
    ASSERT_FALSE(silent.has_value());
    EXPECT_EQ(silent.error().code(), ErrorCode::kProtocolError);
    EXPECT_NE(silent.error().context().find("no complete handshake within 100 ms (0 bytes"),
              std::string::npos)
        << silent.error().ToString();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  }
  {
    // Bytes keep coming, but the array never completes: the deadline still holds.
    SocketPair s;
    std::atomic<bool> stop{false};
    std::thread vmm([&] {
      EXPECT_EQ(write(s.vmm.get(), "[", 1), 1);
      while (!stop) {
        std::this_thread::sleep_for(20ms);
        if (write(s.vmm.get(), " ", 1) != 1) break;
      }
    });
    const auto start = std::chrono::steady_clock::now();
    auto got = ReceiveHandshake(s.handler.get(), 300ms);
    const auto took = std::chrono::steady_clock::now() - start;
    stop = true;
    vmm.join();
    ASSERT_FALSE(got.has_value());
    EXPECT_EQ(got.error().code(), ErrorCode::kProtocolError);
    EXPECT_NE(got.error().context().find("within 300 ms"), std::string::npos);
    EXPECT_GE(took, 300ms);
    EXPECT_LT(took, 2s);
  }
  auto gone = Feed("", false, /*close_after=*/true);
  ASSERT_FALSE(gone.has_value());
  EXPECT_EQ(gone.error().code(), ErrorCode::kPeerGone) << gone.error().ToString();
}

TEST(HandshakeTest, SystemCallFailuresComeThroughTheOsSeam) {
  FaultInjectionOs os;
  const HandshakeRegion r = Region(0x7f0000000000, 1 << 20, 0);
  UniqueFd fd = Memfd();
  int fds[] = {fd.get()};
  {
    SocketPair s;
    os.FailNext(FaultInjectionOs::Call::kSendmsg, EPIPE);
    Status sent = SendHandshake(s.vmm.get(), std::span(&r, 1), fds, &os);
    ASSERT_FALSE(sent.has_value());
    EXPECT_EQ(sent.error().code(), ErrorCode::kPeerGone);
    EXPECT_EQ(sent.error().sys_errno(), EPIPE);
    char byte;
    EXPECT_EQ(recv(s.handler.get(), &byte, 1, MSG_DONTWAIT), -1);  // nothing went out
  }
  {
    SocketPair s;
    os.FailNext(FaultInjectionOs::Call::kSendmsg, EINTR);  // retried
    ASSERT_TRUE(SendHandshake(s.vmm.get(), std::span(&r, 1), fds, &os));
    os.FailNext(FaultInjectionOs::Call::kRecvmsg, EIO);
    auto got = ReceiveHandshake(s.handler.get(), 1s, 3, &os);
    ASSERT_FALSE(got.has_value());
    EXPECT_EQ(got.error().code(), ErrorCode::kIoError);
    EXPECT_NE(got.error().context().find("recvmsg"), std::string::npos);
  }
  {
    SocketPair s;
    ASSERT_TRUE(SendHandshake(s.vmm.get(), std::span(&r, 1), fds, &os));
    os.FailNext(FaultInjectionOs::Call::kRecvmsg, EINTR);  // retried
    const uint64_t calls = os.calls(FaultInjectionOs::Call::kRecvmsg);
    auto got = ReceiveHandshake(s.handler.get(), 1s, 3, &os);
    ASSERT_TRUE(got.has_value()) << got.error().ToString();
    EXPECT_EQ(os.calls(FaultInjectionOs::Call::kRecvmsg), calls + 2);
  }
}

// --- HandshakeReader: the same reading, fed by an event loop --------------------------------

TEST(HandshakeReaderTest, ReadsWhatIsThereAndNeverWaits) {
  SocketPair s;
  const HandshakeRegion r = Region(0x7f0000000000, 1 << 20, 0);
  const std::string json = EncodeHandshake(std::span(&r, 1));
  UniqueFd fd = Memfd();
  HandshakeReader reader;
  // Nothing yet: no wait, no error.
  auto progress = reader.ReadFrom(s.handler.get());
  ASSERT_TRUE(progress.has_value()) << progress.error().ToString();
  EXPECT_EQ(*progress, HandshakeReader::Progress::kNeedMore);
  // Byte by byte, the descriptor with the first: the buffer holds exactly what arrived.
  int fds[] = {fd.get()};
  for (size_t i = 0; i < json.size(); ++i) {
    ASSERT_EQ(SendRaw(s.vmm.get(), json.substr(i, 1),
                      i == 0 ? std::span<const int>(fds) : std::span<const int>()),
              1);
    progress = reader.ReadFrom(s.handler.get());
    ASSERT_TRUE(progress.has_value()) << progress.error().ToString();
    EXPECT_EQ(reader.bytes_received(), i + 1);
    EXPECT_EQ(*progress, i + 1 == json.size() ? HandshakeReader::Progress::kComplete
                                              : HandshakeReader::Progress::kNeedMore);
  }
  ReceivedHandshake got = reader.Take();
  ASSERT_EQ(got.regions.size(), 1u);
  EXPECT_EQ(got.raw_json, json);
  ASSERT_EQ(got.fds.size(), 1u);
  EXPECT_EQ(Inode(got.fds[0].get()), Inode(fd.get()));
  // Complete: it reads no more.
  auto again = reader.ReadFrom(s.handler.get());
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code(), ErrorCode::kFailedPrecondition);
}

TEST(HandshakeReaderTest, LeavesWhatFollowsTheHandshakeOnTheSocket) {
  // Firecracker's second message follows the first on the same socket: it is the next reader's.
  SocketPair s;
  const HandshakeRegion r = Region(0x7f0000000000, 1 << 20, 0);
  UniqueFd fd = Memfd();
  int fds[] = {fd.get()};
  ASSERT_TRUE(SendHandshake(s.vmm.get(), std::span(&r, 1), fds));
  ASSERT_EQ(SendRaw(s.vmm.get(), "no_exitless_apf"), 15);
  HandshakeReader reader;
  auto progress = reader.ReadFrom(s.handler.get());
  ASSERT_TRUE(progress.has_value()) << progress.error().ToString();
  ASSERT_EQ(*progress, HandshakeReader::Progress::kComplete);
  char rest[64];
  ASSERT_EQ(recv(s.handler.get(), rest, sizeof(rest), MSG_DONTWAIT), 15);
  EXPECT_EQ(std::string_view(rest, 15), "no_exitless_apf");
}

TEST(HandshakeReaderTest, TakesAtMostABudgetPerCall) {
  SocketPair s;
  std::vector<HandshakeRegion> regions;
  for (uint64_t i = 0; i < 8000; ++i) {
    regions.push_back(Region(0x7f0000000000 + i * 0x200000, 4096, i * 4096));
  }
  const std::string json = EncodeHandshake(regions);
  ASSERT_GT(json.size(), 3 * 256u * 1024);
  ASSERT_LT(json.size(), kMaxHandshakeBytes);
  UniqueFd fd = Memfd();
  std::thread vmm([&] {
    int fds[] = {fd.get()};
    EXPECT_TRUE(SendHandshake(s.vmm.get(), regions, fds));
  });
  HandshakeReader reader;
  size_t calls = 0;
  while (true) {
    pollfd pfd{s.handler.get(), POLLIN, 0};
    ASSERT_EQ(poll(&pfd, 1, 10000), 1);
    const size_t before = reader.bytes_received();
    auto progress = reader.ReadFrom(s.handler.get());
    ASSERT_TRUE(progress.has_value()) << progress.error().ToString();
    EXPECT_LE(reader.bytes_received() - before, 256u * 1024);
    ++calls;
    if (*progress == HandshakeReader::Progress::kComplete) break;
  }
  vmm.join();
  EXPECT_GE(calls, 3u);
  EXPECT_EQ(reader.Take().regions.size(), 8000u);
}

TEST(HandshakeReaderTest, AnErrorEndsTheReading) {
  SocketPair s;
  ASSERT_EQ(SendRaw(s.vmm.get(), "{}"), 2);
  HandshakeReader reader;
  auto progress = reader.ReadFrom(s.handler.get());
  ASSERT_FALSE(progress.has_value());
  EXPECT_EQ(progress.error().code(), ErrorCode::kProtocolError);
  auto again = reader.ReadFrom(s.handler.get());
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code(), ErrorCode::kFailedPrecondition);
}

TEST(HandshakeTest, ValidationNamesTheRegion) {
  const uint64_t file = 64 << 20;
  auto expect = [&](std::vector<HandshakeRegion> regions, const std::string& fragment) {
    Status s = ValidateHandshake(regions, file);
    ASSERT_FALSE(s.has_value()) << fragment;
    EXPECT_EQ(s.error().code(), ErrorCode::kInvalidArgument) << s.error().ToString();
    EXPECT_NE(s.error().context().find(fragment), std::string::npos) << s.error().ToString();
  };
  expect({}, "no regions");
  expect({Region(0x10000, 4096, 0, 8192)}, "region 0: page_size 8192 is neither");
  expect({Region(0x10000, 0, 0)}, "region 0: size is zero");
  expect({Region(0x10000 + 100, 4096, 0)},
         "region 0: base_host_virt_addr 0x10064 is not aligned to page_size 4096");
  expect({Region(0x200000, 4096, 0, 2 << 20)},
         "region 0: size 0x1000 is not aligned to page_size 2097152");
  expect({Region(0x10000, 4096, 0), Region(0x20000, 4096, 100)},
         "region 1: offset 0x64 is not aligned");
  expect({Region(0x10000, 8192, 0), Region(0x11000, 4096, 8192)},
         "regions 0 and 1 overlap in host addresses");
  expect({Region(0x100000, 4096, 0), Region(0x200000, 4096, 4096), Region(0xff000, 8192, 8192)},
         "regions 0 and 2 overlap in host addresses");
  expect({Region(0x10000, 8192, 0), Region(0x100000, 4096, 4096)},
         "regions 0 and 1 overlap in the memory file");
  expect({Region(0x10000, 4096, file)},
         "region 0: offset 0x4000000 + size 0x1000 lies beyond the end of the memory file");
  expect({Region(0x10000, 4096, 0), Region(0x20000, 8192, file - 4096)},
         "region 1: offset 0x3fff000 + size 0x2000 lies beyond");
  expect({Region(UINT64_MAX - 4095, 8192, 0)}, "region 0: base_host_virt_addr");
  expect({Region(0x10000, 8192, UINT64_MAX - 4095)}, "region 0: offset 0xfffffffffffff000");
  // Adjacent regions, in any order, filling the file exactly, are fine.
  EXPECT_TRUE(ValidateHandshake(std::vector{Region(0x40000000, 2 << 20, 0, 2 << 20),
                                            Region(0x10000, file - (2 << 20), 2 << 20)},
                                file));
  EXPECT_TRUE(
      ValidateHandshake(std::vector{Region(0x20000, 4096, 4096), Region(0x10000, 4096, 0)}, file));
}

}  // namespace
}  // namespace guestmem
