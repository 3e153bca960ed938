#include "guestmem/userfaultfd.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "base/fault_injection_os.h"
#include "guestmem/mapping.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = kPageSize4K;

// Waits (bounded) until the uffd has an event and returns the batch.
std::vector<UffdEvent> WaitEvents(Userfaultfd& uffd, int timeout_ms = 5000) {
  std::vector<UffdEvent> events;
  pollfd pfd{uffd.fd(), POLLIN, 0};
  if (poll(&pfd, 1, timeout_ms) != 1) {
    ADD_FAILURE() << "no userfaultfd event within " << timeout_ms << " ms";
    return events;
  }
  auto n = uffd.ReadEvents(&events);
  EXPECT_TRUE(n.has_value()) << n.error().ToString();
  return events;
}

PagefaultEvent WaitFault(Userfaultfd& uffd) {
  auto events = WaitEvents(uffd);
  if (events.empty() || !std::holds_alternative<PagefaultEvent>(events[0])) {
    ADD_FAILURE() << "expected a page fault event";
    return {};
  }
  return std::get<PagefaultEvent>(events[0]);
}

Userfaultfd MustCreate(UffdOptions options = {}) {
  auto uffd = Userfaultfd::Create(options);
  EXPECT_TRUE(uffd.has_value()) << uffd.error().ToString();
  return std::move(*uffd);
}

TEST(UserfaultfdTest, ProbeReportsKernelFeatures) {
  auto info = Userfaultfd::Probe();
  ASSERT_TRUE(info.has_value()) << info.error().ToString();
  EXPECT_NE(info->features & kUffdFeatureEventRemove, 0u);
  EXPECT_NE(info->features & kUffdFeatureMissingShmem, 0u);
  auto names = UffdFeatureNames(kUffdFeatureEventRemove | kUffdFeaturePoison);
  EXPECT_EQ(names, (std::vector<std::string>{"EVENT_REMOVE", "POISON"}));
}

TEST(UserfaultfdTest, FallsBackToTheSyscallWithoutTheDevice) {
  FaultInjectionOs os;
  os.FailAlways(FaultInjectionOs::Call::kOpen, ENOENT);
  auto uffd = Userfaultfd::Create({.os = &os});
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  EXPECT_GE(os.calls(FaultInjectionOs::Call::kUserfaultfd), 1u);
  os.FailAlways(FaultInjectionOs::Call::kUserfaultfd, EPERM);
  auto denied = Userfaultfd::Create({.os = &os});
  ASSERT_FALSE(denied.has_value());
  EXPECT_EQ(denied.error().code(), ErrorCode::kPermissionDenied);
}

TEST(UserfaultfdTest, MissingRequiredFeatureIsNamed) {
  auto info = Userfaultfd::Probe();
  ASSERT_TRUE(info.has_value());
  const uint64_t absent = uint64_t{1} << 40;  // no kernel has this bit
  auto uffd = Userfaultfd::Create({.required_features = absent | kUffdFeatureEventRemove});
  ASSERT_FALSE(uffd.has_value());
  EXPECT_EQ(uffd.error().code(), ErrorCode::kUnsupported);
  EXPECT_NE(uffd.error().context().find("bit40"), std::string::npos) << uffd.error().ToString();
  // Optional features the kernel lacks are dropped, not fatal.
  auto ok = Userfaultfd::Create({.optional_features = absent | kUffdFeatureEventRemove});
  ASSERT_TRUE(ok.has_value());
  EXPECT_TRUE(ok->HasFeature(kUffdFeatureEventRemove));
  EXPECT_FALSE(ok->HasFeature(absent));
}

TEST(UserfaultfdTest, MissingFaultAnsweredWithCopy) {
  Userfaultfd uffd = MustCreate();
  auto mem = Mapping::Anonymous(4 * kPage);
  ASSERT_TRUE(mem.has_value());
  auto ioctls = uffd.Register(HostVirtAddr(mem->address()), 4 * kPage, UffdModes::kMissing);
  ASSERT_TRUE(ioctls.has_value()) << ioctls.error().ToString();
  EXPECT_NE(*ioctls & (uint64_t{1} << 0x03), 0u);  // COPY allowed

  std::atomic<uint8_t> seen{0};
  std::thread toucher([&] { seen = static_cast<uint8_t*>(mem->data())[2 * kPage + 7]; });
  PagefaultEvent fault = WaitFault(uffd);
  EXPECT_EQ(fault.kind, PagefaultKind::kMissing);
  EXPECT_FALSE(fault.write);
  EXPECT_EQ(fault.address.AlignDown(kPage).value(), mem->address() + 2 * kPage);
  std::vector<uint8_t> content(kPage, 0xc3);
  auto copied = uffd.Copy(fault.address.AlignDown(kPage), content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, UffdProgress::Outcome::kDone);
  EXPECT_EQ(copied->bytes, static_cast<int64_t>(kPage));
  toucher.join();
  EXPECT_EQ(seen.load(), 0xc3);

  // Copying onto the now-present page is an outcome, not an error.
  auto again = uffd.Copy(fault.address.AlignDown(kPage), content.data(), kPage);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->outcome, UffdProgress::Outcome::kExists);
  // A range partly present: the kernel installs the first page, stops at the present one and
  // reports the partial progress as EAGAIN with the count; the rest then reports EEXIST.
  auto partial = uffd.Copy(HostVirtAddr(mem->address() + kPage), content.data(), 2 * kPage);
  ASSERT_TRUE(partial.has_value());
  EXPECT_EQ(partial->outcome, UffdProgress::Outcome::kAgain);
  EXPECT_EQ(partial->bytes, static_cast<int64_t>(kPage));
  auto rest = uffd.Copy(HostVirtAddr(mem->address() + 2 * kPage), content.data(), kPage);
  ASSERT_TRUE(rest.has_value());
  EXPECT_EQ(rest->outcome, UffdProgress::Outcome::kExists);
  EXPECT_EQ(rest->bytes, 0);
}

TEST(UserfaultfdTest, ZeroPageAndWriteFaultFlag) {
  Userfaultfd uffd = MustCreate();
  auto mem = Mapping::Anonymous(2 * kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), 2 * kPage, UffdModes::kMissing));
  std::thread writer([&] { static_cast<uint8_t*>(mem->data())[kPage] = 9; });
  PagefaultEvent fault = WaitFault(uffd);
  EXPECT_TRUE(fault.write);
  auto zeroed = uffd.ZeroPage(HostVirtAddr(mem->address()), 2 * kPage);
  ASSERT_TRUE(zeroed.has_value()) << zeroed.error().ToString();
  EXPECT_EQ(zeroed->outcome, UffdProgress::Outcome::kDone);
  writer.join();
  EXPECT_EQ(static_cast<uint8_t*>(mem->data())[kPage], 9);
  EXPECT_EQ(static_cast<uint8_t*>(mem->data())[0], 0);
}

TEST(UserfaultfdTest, InvalidRangesAreErrors) {
  Userfaultfd uffd = MustCreate();
  auto mem = Mapping::Anonymous(kPage);
  auto unaligned = uffd.Register(HostVirtAddr(mem->address() + 1), kPage, UffdModes::kMissing);
  ASSERT_FALSE(unaligned.has_value());
  EXPECT_EQ(unaligned.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(uffd.Register(HostVirtAddr(mem->address()), kPage, UffdModes::kNone).error().code(),
            ErrorCode::kInvalidArgument);
  std::vector<uint8_t> content(kPage);
  auto copy = uffd.Copy(HostVirtAddr(mem->address()), content.data(), kPage);  // not registered
  EXPECT_FALSE(copy.has_value());
}

TEST(UserfaultfdTest, FullMinorTrapOnShmem) {
  auto info = Userfaultfd::Probe();
  ASSERT_TRUE(info.has_value());
  if ((info->features & kUffdFeatureMinorShmem) == 0) GTEST_SKIP() << "no MINOR_SHMEM";
  Userfaultfd uffd = MustCreate({.required_features = kUffdFeatureMinorShmem});
  UniqueFd memfd(memfd_create("minor", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(memfd.get(), 4 * kPage), 0);
  // Page 1 has content in the file already; page 2 has none.
  std::vector<uint8_t> content(kPage, 0x42);
  ASSERT_EQ(pwrite(memfd.get(), content.data(), kPage, kPage), static_cast<ssize_t>(kPage));
  auto mem = Mapping::Map(4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
  ASSERT_TRUE(mem.has_value());
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), 4 * kPage,
                            UffdModes::kMissing | UffdModes::kMinor));
  const auto* bytes = static_cast<const uint8_t*>(mem->data());

  std::atomic<uint8_t> seen{0};
  std::thread reader([&] { seen = bytes[kPage]; });
  PagefaultEvent fault = WaitFault(uffd);
  EXPECT_EQ(fault.kind, PagefaultKind::kMinor);  // in the page cache, not mapped
  auto cont = uffd.Continue(HostVirtAddr(mem->address() + kPage), kPage);
  ASSERT_TRUE(cont.has_value()) << cont.error().ToString();
  EXPECT_EQ(cont->outcome, UffdProgress::Outcome::kDone);
  reader.join();
  EXPECT_EQ(seen.load(), 0x42);

  // A never-written page traps as MISSING; write the content into the file, then CONTINUE.
  std::thread reader2([&] { seen = bytes[2 * kPage + 5]; });
  fault = WaitFault(uffd);
  EXPECT_EQ(fault.kind, PagefaultKind::kMissing);
  std::fill(content.begin(), content.end(), 0x77);
  ASSERT_EQ(pwrite(memfd.get(), content.data(), kPage, 2 * kPage), static_cast<ssize_t>(kPage));
  cont = uffd.Continue(HostVirtAddr(mem->address() + 2 * kPage), kPage);
  ASSERT_TRUE(cont.has_value()) << cont.error().ToString();
  reader2.join();
  EXPECT_EQ(seen.load(), 0x77);
}

TEST(UserfaultfdTest, WakeLetsTheThreadRetry) {
  Userfaultfd uffd = MustCreate();
  auto mem = Mapping::Anonymous(kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), kPage, UffdModes::kMissing));
  std::atomic<uint8_t> seen{1};
  std::thread reader([&] { seen = static_cast<uint8_t*>(mem->data())[0]; });
  (void)WaitFault(uffd);
  // Unregister, then wake: the retried access finds plain anonymous memory (zero).
  ASSERT_TRUE(uffd.Unregister(HostVirtAddr(mem->address()), kPage));
  ASSERT_TRUE(uffd.Wake(HostVirtAddr(mem->address()), kPage));
  reader.join();
  EXPECT_EQ(seen.load(), 0);
}

TEST(UserfaultfdTest, WriteProtectFault) {
  auto info = Userfaultfd::Probe();
  if (!info || !(info->features & kUffdFeaturePagefaultFlagWp)) GTEST_SKIP() << "no WP";
  Userfaultfd uffd = MustCreate({.required_features = kUffdFeaturePagefaultFlagWp});
  auto mem = Mapping::Anonymous(kPage);
  static_cast<uint8_t*>(mem->data())[0] = 1;  // populate before registering
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), kPage, UffdModes::kWriteProtect));
  ASSERT_TRUE(uffd.WriteProtect(HostVirtAddr(mem->address()), kPage, true));
  std::thread writer([&] { static_cast<uint8_t*>(mem->data())[0] = 2; });
  PagefaultEvent fault = WaitFault(uffd);
  EXPECT_EQ(fault.kind, PagefaultKind::kWriteProtect);
  EXPECT_TRUE(fault.write);
  ASSERT_TRUE(uffd.WriteProtect(HostVirtAddr(mem->address()), kPage, false));
  writer.join();
  EXPECT_EQ(static_cast<uint8_t*>(mem->data())[0], 2);
}

TEST(UserfaultfdTest, RemoveEventAndEagainWhileItIsUnread) {
  Userfaultfd uffd = MustCreate({.required_features = kUffdFeatureEventRemove});
  auto mem = Mapping::Anonymous(8 * kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), 8 * kPage, UffdModes::kMissing));
  std::vector<uint8_t> content(8 * kPage, 0x11);
  ASSERT_EQ(uffd.Copy(HostVirtAddr(mem->address()), content.data(), 8 * kPage)->outcome,
            UffdProgress::Outcome::kDone);
  // madvise blocks until the REMOVE event is read, so run it in a thread.
  std::thread balloon([&] { ASSERT_EQ(madvise(mem->data(), 4 * kPage, MADV_DONTNEED), 0); });
  pollfd pfd{uffd.fd(), POLLIN, 0};
  ASSERT_EQ(poll(&pfd, 1, 5000), 1);
  // While the REMOVE is pending, installs report EAGAIN (a retry outcome).
  auto blocked = uffd.Copy(HostVirtAddr(mem->address()), content.data(), kPage);
  ASSERT_TRUE(blocked.has_value()) << blocked.error().ToString();
  EXPECT_EQ(blocked->outcome, UffdProgress::Outcome::kAgain);
  std::vector<UffdEvent> events;
  ASSERT_EQ(uffd.ReadEvents(&events).value_or(0), 1u);
  ASSERT_TRUE(std::holds_alternative<RemoveEvent>(events[0]));
  EXPECT_EQ(std::get<RemoveEvent>(events[0]).start.value(), mem->address());
  EXPECT_EQ(std::get<RemoveEvent>(events[0]).end.value(), mem->address() + 4 * kPage);
  balloon.join();
  // Drained: the retry goes through.
  auto retried = uffd.Copy(HostVirtAddr(mem->address()), content.data(), kPage);
  ASSERT_TRUE(retried.has_value());
  EXPECT_EQ(retried->outcome, UffdProgress::Outcome::kDone);
}

TEST(UserfaultfdTest, BatchedReadReturnsSeveralEvents) {
  Userfaultfd uffd = MustCreate();
  auto mem = Mapping::Anonymous(4 * kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), 4 * kPage, UffdModes::kMissing));
  std::vector<std::thread> readers;
  for (int i = 0; i < 3; ++i) {
    readers.emplace_back([&, i] { (void)static_cast<volatile uint8_t*>(mem->data())[i * kPage]; });
  }
  std::vector<UffdEvent> events;
  for (int tries = 0; tries < 500 && events.size() < 3; ++tries) {
    auto n = uffd.ReadEvents(&events);
    ASSERT_TRUE(n.has_value());
    if (events.size() < 3) usleep(2000);
  }
  EXPECT_EQ(events.size(), 3u);
  ASSERT_TRUE(uffd.ZeroPage(HostVirtAddr(mem->address()), 4 * kPage));
  for (auto& t : readers) t.join();
}

// Runs `body` in a forked child and returns its wait status.
template <typename Body>
int InChild(Body body) {
  pid_t pid = fork();
  if (pid == 0) {
    body();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

TEST(UserfaultfdTest, PoisonDeliversSigbus) {
  auto info = Userfaultfd::Probe();
  if (!info || !(info->features & kUffdFeaturePoison)) GTEST_SKIP() << "no UFFDIO_POISON";
  int status = InChild([] {
    auto uffd = Userfaultfd::Create({.required_features = kUffdFeaturePoison});
    auto mem = Mapping::Anonymous(kPage);
    if (!uffd || !mem || !uffd->Register(HostVirtAddr(mem->address()), kPage, UffdModes::kMissing)) {
      _exit(2);
    }
    auto poisoned = uffd->Poison(HostVirtAddr(mem->address()), kPage);
    if (!poisoned || poisoned->outcome != UffdProgress::Outcome::kDone) _exit(3);
    (void)static_cast<volatile uint8_t*>(mem->data())[0];
    _exit(4);  // not reached: SIGBUS
  });
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
}

TEST(UserfaultfdTest, PoisonNeedsNoNegotiation) {
  // Firecracker's uffd negotiates only EVENT_REMOVE. The kernel accepts UFFDIO_POISON on it all
  // the same (the feature bit only advertises the ioctl), which is what lets a handler poison a
  // page it cannot supply instead of leaving the VM hanging.
  auto info = Userfaultfd::Probe();
  if (!info || !(info->features & kUffdFeaturePoison)) GTEST_SKIP() << "no UFFDIO_POISON";
  Userfaultfd uffd = MustCreate({.required_features = kUffdFeatureEventRemove});
  EXPECT_FALSE(uffd.HasFeature(kUffdFeaturePoison));
  auto mem = Mapping::Anonymous(kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(mem->address()), kPage, UffdModes::kMissing));
  auto poisoned = uffd.Poison(HostVirtAddr(mem->address()), kPage);
  ASSERT_TRUE(poisoned.has_value()) << poisoned.error().ToString();
  EXPECT_EQ(poisoned->outcome, UffdProgress::Outcome::kDone);
}

TEST(UserfaultfdTest, MoveBetweenRegisteredRanges) {
  auto info = Userfaultfd::Probe();
  if (!info || !(info->features & kUffdFeatureMove)) GTEST_SKIP() << "no UFFDIO_MOVE";
  Userfaultfd uffd = MustCreate({.required_features = kUffdFeatureMove});
  auto src = Mapping::Anonymous(kPage);
  auto dst = Mapping::Anonymous(kPage);
  std::memset(src->data(), 0x5e, kPage);
  ASSERT_TRUE(uffd.Register(HostVirtAddr(dst->address()), kPage, UffdModes::kMissing));
  ASSERT_TRUE(uffd.Register(HostVirtAddr(src->address()), kPage, UffdModes::kMissing));
  auto moved = uffd.Move(HostVirtAddr(dst->address()), HostVirtAddr(src->address()), kPage);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  EXPECT_EQ(moved->outcome, UffdProgress::Outcome::kDone);
  EXPECT_EQ(static_cast<uint8_t*>(dst->data())[100], 0x5e);
}

TEST(UserfaultfdTest, TaskGoneAfterTheOwnerExits) {
  // The child registers memory, hands us its uffd, and exits: installing then reports kTaskGone.
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  void* child_mem = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  int status = InChild([&] {
    auto uffd = Userfaultfd::Create();
    if (!uffd || !uffd->Register(HostVirtAddr(reinterpret_cast<uint64_t>(child_mem)), kPage,
                                 UffdModes::kMissing)) {
      _exit(2);
    }
    int fd = uffd->fd();
    char byte = 'u';
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    if (sendmsg(sv[1], &msg, 0) != 1) _exit(3);
  });
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  char byte;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ASSERT_EQ(recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC), 1);
  int received;
  std::memcpy(&received, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(int));
  auto uffd = Userfaultfd::Adopt(UniqueFd(received));
  ASSERT_TRUE(uffd.has_value());
  std::vector<uint8_t> content(kPage, 1);
  auto copied = uffd->Copy(HostVirtAddr(reinterpret_cast<uint64_t>(child_mem)), content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, UffdProgress::Outcome::kTaskGone);
  munmap(child_mem, kPage);
  close(sv[0]);
  close(sv[1]);
}

}  // namespace
}  // namespace guestmem
