// Tests of the userfaultfd layer against the running kernel's real uffds. Faults are taken by
// helper threads (or forked children) and served by the test; every wait has a deadline, and a
// thread left blocked in the kernel is released by closing the uffd, so a broken test fails
// instead of hanging.
#include "guestmem/userfaultfd.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <thread>

#include "base/fault_injection_os.h"
#include "guestmem/mapping.h"
#include "uffd/uffd_abi.h"

namespace guestmem {
namespace {

using std::chrono::milliseconds;
using Call = FaultInjectionOs::Call;
using Outcome = UffdProgress::Outcome;

constexpr uint64_t kPage = kPageSize4K;
constexpr milliseconds kDeadline{5000};

// strerror without its thread-safety problem.
std::string ErrnoText() { return strerrordesc_np(errno); }

HostVirtAddr At(const Mapping& mapping, uint64_t offset = 0) {
  return HostVirtAddr(mapping.address() + offset);
}

// Accesses guest-style memory that another thread may be blocked on, without a data race in the
// eyes of ThreadSanitizer (the kernel, not the program, orders these accesses).
uint8_t Load(const Mapping& mapping, uint64_t offset) {
  return std::atomic_ref<uint8_t>(reinterpret_cast<uint8_t*>(mapping.bytes())[offset])
      .load(std::memory_order_relaxed);
}
void Store(const Mapping& mapping, uint64_t offset, uint8_t value) {
  std::atomic_ref<uint8_t>(reinterpret_cast<uint8_t*>(mapping.bytes())[offset])
      .store(value, std::memory_order_relaxed);
}

bool Resident(const Mapping& mapping, uint64_t offset) {
  unsigned char vec = 0;
  EXPECT_EQ(mincore(mapping.bytes() + offset, kPage, &vec), 0) << ErrnoText();
  return (vec & 1) != 0;
}

bool PageFilledWith(const Mapping& mapping, uint64_t offset, uint8_t value) {
  for (uint64_t i = 0; i < kPage; ++i) {
    if (Load(mapping, offset + i) != value) return false;
  }
  return true;
}

size_t OpenDescriptors() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count;
}

Mapping MustMap(uint64_t size) {
  auto mapping = Mapping::Anonymous(size);
  EXPECT_TRUE(mapping.has_value()) << mapping.error().ToString();
  return mapping ? std::move(*mapping) : Mapping();
}

std::optional<Userfaultfd> MustCreate(const UffdOptions& options = {}) {
  auto uffd = Userfaultfd::Create(options);
  EXPECT_TRUE(uffd.has_value()) << uffd.error().ToString();
  if (!uffd) return std::nullopt;
  return std::move(*uffd);
}

// Why the running kernel cannot run a test needing `wanted` features ("" if it can).
std::string KernelLacks(uint64_t wanted) {
  auto probe = Userfaultfd::Probe();
  if (!probe) return "userfaultfd unavailable: " + probe.error().ToString();
  if ((probe->features & wanted) == wanted) return "";
  return "the running kernel lacks userfaultfd feature(s) " +
         UffdFeatureList(wanted & ~probe->features);
}
#define SKIP_UNLESS_KERNEL_OFFERS(wanted) \
  if (const std::string why_ = KernelLacks(wanted); !why_.empty()) GTEST_SKIP() << why_

// Runs `fn` on a thread that may block in the kernel on `uffd` (a fault, or an event waiting to
// be read). Finish() waits for it; if it has not returned by the deadline, the uffd is closed,
// which releases every fault and event blocked on it. Declare it after the uffd it watches.
class BlockingCall {
 public:
  BlockingCall(std::optional<Userfaultfd>* uffd, std::function<void()> fn)
      : uffd_(uffd), thread_([this, fn = std::move(fn)] {
          fn();
          done_.store(true);
        }) {}
  ~BlockingCall() { Finish(); }

  bool done() const { return done_.load(); }

  // True if the call returned before the deadline.
  bool Finish(milliseconds deadline = kDeadline) {
    if (!thread_.joinable()) return in_time_;
    const auto until = std::chrono::steady_clock::now() + deadline;
    while (!done_.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    in_time_ = done_.load();
    if (!in_time_) {
      ADD_FAILURE() << "a call blocked on the uffd did not return; closing the uffd";
      uffd_->reset();
    }
    thread_.join();
    return in_time_;
  }

 private:
  std::optional<Userfaultfd>* uffd_;
  std::atomic<bool> done_{false};
  bool in_time_ = false;
  std::thread thread_;
};

// Reads events until `want` arrived or the deadline passed.
std::vector<UffdEvent> WaitEvents(Userfaultfd& uffd, size_t want = 1,
                                  milliseconds deadline = kDeadline) {
  std::vector<UffdEvent> events;
  const auto until = std::chrono::steady_clock::now() + deadline;
  while (events.size() < want) {
    const auto left =
        std::chrono::duration_cast<milliseconds>(until - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      ADD_FAILURE() << "only " << events.size() << " of " << want << " userfaultfd events within "
                    << deadline.count() << " ms";
      break;
    }
    pollfd pfd{uffd.fd(), POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(left)) <= 0) continue;
    auto n = uffd.ReadEvents(&events, want - events.size());
    if (!n) {
      ADD_FAILURE() << n.error().ToString();
      break;
    }
  }
  return events;
}

// The single event of a batch, if it is one of type T.
template <typename T>
std::optional<T> Only(std::vector<UffdEvent> events) {
  if (events.size() != 1 || !std::holds_alternative<T>(events[0])) {
    ADD_FAILURE() << "expected exactly one event of the right type, got " << events.size()
                  << " event(s), first of type index "
                  << (events.empty() ? -1 : static_cast<int>(events[0].index()));
    return std::nullopt;
  }
  return std::move(std::get<T>(events[0]));
}

// Waits until `uffd` has `count` faults queued and unread.
bool WaitPendingFaults(const Userfaultfd& uffd, uint64_t count) {
  const auto until = std::chrono::steady_clock::now() + kDeadline;
  while (std::chrono::steady_clock::now() < until) {
    auto info = uffd.Inspect();
    if (!info) {
      ADD_FAILURE() << info.error().ToString();
      return false;
    }
    if (info->pending_faults == count) return true;
    std::this_thread::sleep_for(milliseconds(1));
  }
  ADD_FAILURE() << "fewer than " << count << " faults pending after " << kDeadline.count() << " ms";
  return false;
}

// Forked children. The body runs in the child, which exits with its return value.
pid_t StartChild(const std::function<int()>& body) {
  const pid_t pid = fork();
  if (pid == 0) _exit(body());
  EXPECT_GT(pid, 0) << ErrnoText();
  return pid;
}

// The child's wait status; kills it if it has not exited by the deadline.
int WaitChild(pid_t pid) {
  if (pid <= 0) return -1;
  const auto until = std::chrono::steady_clock::now() + kDeadline;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() >= until) {
      ADD_FAILURE() << "child " << pid << " did not exit in time; killing it";
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return status;
    }
    std::this_thread::sleep_for(milliseconds(1));
  }
  return status;
}

// One byte of data with room for one descriptor, laid out as sendmsg/recvmsg want it.
// Points into itself: use it where it is declared.
struct FdMessage {
  FdMessage() {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
  }
  FdMessage(const FdMessage&) = delete;
  FdMessage& operator=(const FdMessage&) = delete;

  char byte = 'u';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
};

bool SendFd(int socket, int fd) {
  FdMessage m;
  cmsghdr* cmsg = CMSG_FIRSTHDR(&m.msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  return sendmsg(socket, &m.msg, 0) == 1;
}

UniqueFd ReceiveFd(int socket) {
  pollfd pfd{socket, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(kDeadline.count())) != 1) {
    ADD_FAILURE() << "no descriptor arrived";
    return UniqueFd();
  }
  FdMessage m;
  if (recvmsg(socket, &m.msg, MSG_CMSG_CLOEXEC) != 1) return UniqueFd();
  cmsghdr* cmsg = CMSG_FIRSTHDR(&m.msg);
  if (cmsg == nullptr || cmsg->cmsg_type != SCM_RIGHTS) return UniqueFd();
  int fd;
  std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
  return UniqueFd(fd);
}

struct SocketPair {
  SocketPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0) << ErrnoText();
    parent.reset(sv[0]);
    child.reset(sv[1]);
  }
  UniqueFd parent;
  UniqueFd child;
};

// ---------------------------------------------------------------------------------------------
// Creation, negotiation, adoption.

TEST(UserfaultfdTest, ProbeReportsWhatTheKernelOffers) {
  auto info = Userfaultfd::Probe();
  ASSERT_TRUE(info.has_value()) << info.error().ToString();
  EXPECT_NE(info->features & kUffdFeatureEventRemove, 0u) << UffdFeatureList(info->features);
  EXPECT_NE(info->features & kUffdFeatureMissingShmem, 0u) << UffdFeatureList(info->features);
  EXPECT_TRUE(HasUffdIoctl(info->ioctls, UffdIoctl::kApi));
  EXPECT_TRUE(HasUffdIoctl(info->ioctls, UffdIoctl::kRegister));
  EXPECT_TRUE(HasUffdIoctl(info->ioctls, UffdIoctl::kUnregister));
  EXPECT_EQ(info->device, access("/dev/userfaultfd", R_OK | W_OK) == 0);
}

TEST(UserfaultfdTest, FeatureNames) {
  EXPECT_EQ(UffdFeatureName(kUffdFeatureEventRemove), "EVENT_REMOVE");
  EXPECT_EQ(UffdFeatureName(kUffdFeatureMove), "MOVE");
  EXPECT_EQ(UffdFeatureName(kUffdFeaturePagefaultFlagWp), "PAGEFAULT_FLAG_WP");
  EXPECT_EQ(UffdFeatureName(0), "");
  EXPECT_EQ(UffdFeatureName(kUffdFeatureEventFork | kUffdFeatureEventRemap), "");  // two bits
  EXPECT_EQ(UffdFeatureName(uint64_t{1} << 40), "");
  EXPECT_EQ(UffdFeatureNames(kUffdFeatureEventRemove | kUffdFeaturePoison | (uint64_t{1} << 40)),
            (std::vector<std::string>{"EVENT_REMOVE", "POISON", "bit40"}));
  EXPECT_EQ(UffdFeatureList(0), "none");
  EXPECT_EQ(UffdFeatureList(kUffdFeatureMove | kUffdFeatureEventRemove), "EVENT_REMOVE, MOVE");
  EXPECT_EQ(UffdOutcomeName(Outcome::kTaskGone), "task gone");
}

TEST(UserfaultfdTest, CreatesThroughTheDeviceWithOneHandshake) {
  if (access("/dev/userfaultfd", R_OK | W_OK) != 0) GTEST_SKIP() << "no usable /dev/userfaultfd";
  FaultInjectionOs os;
  auto uffd = Userfaultfd::Create({.optional_features = kUffdFeatureEventRemove, .os = &os});
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  EXPECT_EQ(os.calls(Call::kOpen), 1u);
  EXPECT_EQ(os.calls(Call::kUserfaultfd), 0u);
  EXPECT_EQ(os.calls(Call::kIoctl), 2u);  // USERFAULTFD_IOC_NEW, UFFDIO_API: no probing needed
  EXPECT_TRUE(uffd->HasFeature(kUffdFeatureEventRemove));
  EXPECT_NE(fcntl(uffd->fd(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_NE(fcntl(uffd->fd(), F_GETFD) & FD_CLOEXEC, 0);

  auto blocking = Userfaultfd::Create({.non_blocking = false, .user_mode_only = true});
  ASSERT_TRUE(blocking.has_value()) << blocking.error().ToString();
  EXPECT_EQ(fcntl(blocking->fd(), F_GETFL) & O_NONBLOCK, 0);
  Mapping mem = MustMap(kPage);
  EXPECT_TRUE(blocking->Register(At(mem), kPage, UffdModes::kMissing).has_value());
}

TEST(UserfaultfdTest, FallsBackToTheSystemCall) {
  // No device at all.
  FaultInjectionOs no_device;
  no_device.FailAlways(Call::kOpen, ENOENT);
  auto uffd = Userfaultfd::Create({.os = &no_device});
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  EXPECT_EQ(no_device.calls(Call::kUserfaultfd), 1u);
  Mapping mem = MustMap(kPage);
  auto ioctls = uffd->Register(At(mem), kPage, UffdModes::kMissing);
  ASSERT_TRUE(ioctls.has_value()) << ioctls.error().ToString();
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kCopy));

  // The device opens but refuses to make a uffd.
  FaultInjectionOs refusing;
  refusing.FailNext(Call::kIoctl, EPERM);
  auto fallback = Userfaultfd::Create({.os = &refusing});
  ASSERT_TRUE(fallback.has_value()) << fallback.error().ToString();
  EXPECT_EQ(refusing.calls(Call::kUserfaultfd), 1u);

  // Neither way works: the error names both.
  no_device.FailAlways(Call::kUserfaultfd, EPERM);
  auto denied = Userfaultfd::Create({.os = &no_device});
  ASSERT_FALSE(denied.has_value());
  EXPECT_EQ(denied.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_EQ(denied.error().sys_errno(), EPERM);
  EXPECT_NE(denied.error().context().find("/dev/userfaultfd"), std::string::npos)
      << denied.error().ToString();
  EXPECT_NE(denied.error().context().find("userfaultfd(2)"), std::string::npos)
      << denied.error().ToString();
}

TEST(UserfaultfdTest, MissingRequiredFeatureIsNamedAndLeaksNothing) {
  const uint64_t absent = uint64_t{1} << 40;  // no kernel offers this bit
  const size_t fds_before = OpenDescriptors();
  auto uffd = Userfaultfd::Create({.required_features = absent | kUffdFeatureEventRemove});
  ASSERT_FALSE(uffd.has_value());
  EXPECT_EQ(uffd.error().code(), ErrorCode::kUnsupported);
  EXPECT_NE(uffd.error().context().find("lacks required feature(s) bit40 ("), std::string::npos)
      << uffd.error().ToString();
  EXPECT_EQ(OpenDescriptors(), fds_before);

  // Optional features the kernel lacks are left out, not fatal; the kernel agrees on the result.
  auto ok = Userfaultfd::Create({.optional_features = absent | kUffdFeatureEventRemove});
  ASSERT_TRUE(ok.has_value()) << ok.error().ToString();
  EXPECT_EQ(ok->features(), kUffdFeatureEventRemove);
  auto info = ok->Inspect();
  ASSERT_TRUE(info.has_value()) << info.error().ToString();
  EXPECT_EQ(info->features, kUffdFeatureEventRemove);
}

TEST(UserfaultfdTest, EventForkWithoutPrivilegeIsDroppedUnlessRequired) {
  // The kernel refuses EVENT_FORK with EPERM to a caller without CAP_SYS_PTRACE; the refusal is
  // injected here on UFFDIO_API (the ioctl after USERFAULTFD_IOC_NEW).
  if (access("/dev/userfaultfd", R_OK | W_OK) != 0) GTEST_SKIP() << "no usable /dev/userfaultfd";
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureEventFork);
  FaultInjectionOs os;
  os.FailNext(Call::kIoctl, EPERM, 1, 1);
  auto optional = Userfaultfd::Create(
      {.optional_features = kUffdFeatureEventFork | kUffdFeatureEventRemove, .os = &os});
  ASSERT_TRUE(optional.has_value()) << optional.error().ToString();
  EXPECT_EQ(optional->features(), kUffdFeatureEventRemove);

  os.FailNext(Call::kIoctl, EPERM, 1, 1);
  auto required = Userfaultfd::Create({.required_features = kUffdFeatureEventFork, .os = &os});
  ASSERT_FALSE(required.has_value());
  EXPECT_EQ(required.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_NE(required.error().context().find("EVENT_FORK"), std::string::npos);
}

TEST(UserfaultfdTest, AdoptLearnsTheNegotiatedFeaturesAndRejectsOtherDescriptors) {
  auto created = MustCreate({.required_features = kUffdFeatureEventRemove});
  ASSERT_TRUE(created);
  auto adopted = Userfaultfd::Adopt(UniqueFd(fcntl(created->fd(), F_DUPFD_CLOEXEC, 0)));
  ASSERT_TRUE(adopted.has_value()) << adopted.error().ToString();
  EXPECT_EQ(adopted->features(), kUffdFeatureEventRemove);

  // Told the features: believes them and asks the kernel nothing.
  FaultInjectionOs os;
  auto told = Userfaultfd::Adopt(UniqueFd(fcntl(created->fd(), F_DUPFD_CLOEXEC, 0)),
                                 kUffdFeatureEventRemove | kUffdFeatureThreadId, &os);
  ASSERT_TRUE(told.has_value());
  EXPECT_EQ(told->features(), kUffdFeatureEventRemove | kUffdFeatureThreadId);
  EXPECT_EQ(os.calls(Call::kOpen), 0u);

  int pipe_fds[2];
  ASSERT_EQ(pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd write_end(pipe_fds[1]);
  auto pipe = Userfaultfd::Adopt(UniqueFd(pipe_fds[0]));
  ASSERT_FALSE(pipe.has_value());
  EXPECT_EQ(pipe.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(pipe.error().context().find("is not a userfaultfd"), std::string::npos)
      << pipe.error().ToString();
  EXPECT_EQ(fcntl(pipe_fds[0], F_GETFD), -1);  // closed with the refusal
  EXPECT_EQ(errno, EBADF);

  auto none = Userfaultfd::Adopt(UniqueFd());
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code(), ErrorCode::kInvalidArgument);
}

TEST(UserfaultfdTest, AdoptServesAChildThatSentItsUffdOverASocket) {
  // Firecracker's side of the handshake, in a child: create, register, send the uffd with
  // SCM_RIGHTS, then touch guest memory and check what the handler installed.
  Mapping mem = MustMap(2 * kPage);  // the child's copy of it is the one registered
  SocketPair sockets;
  const pid_t child = StartChild([&] {
    auto uffd = Userfaultfd::Create({.required_features = kUffdFeatureEventRemove});
    if (!uffd || !uffd->Register(At(mem), 2 * kPage, UffdModes::kMissing)) return 2;
    if (!SendFd(sockets.child.get(), uffd->fd())) return 3;
    // Only the handler's copy stays open: if the handler goes away, the fault below is released.
    { Userfaultfd dropped = std::move(*uffd); }
    return PageFilledWith(mem, kPage, 0x5a) ? 0 : 4;
  });
  auto uffd = Userfaultfd::Adopt(ReceiveFd(sockets.parent.get()));
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  EXPECT_EQ(uffd->features(), kUffdFeatureEventRemove);  // as the child negotiated
  auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->address, At(mem, kPage));
  EXPECT_EQ(fault->kind, PagefaultKind::kMissing);
  std::vector<uint8_t> content(kPage, 0x5a);
  auto copied = uffd->Copy(At(mem, kPage), content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, Outcome::kDone);
  const int status = WaitChild(child);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_FALSE(Resident(mem, kPage));  // the parent's own copy was never touched
}

// ---------------------------------------------------------------------------------------------
// Argument checking and error mapping.

TEST(UserfaultfdTest, InvalidArgumentsAreRefusedBeforeTheKernelSeesThem) {
  Mapping mem = MustMap(2 * kPage);
  FaultInjectionOs os;
  auto uffd = MustCreate({.os = &os});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 2 * kPage, UffdModes::kMissing).has_value());
  const uint64_t ioctls_before = os.calls(Call::kIoctl);
  const uint64_t reads_before = os.calls(Call::kRead);
  std::vector<uint8_t> buf(2 * kPage, 1);

  auto expect_invalid = [](const auto& result, std::string_view words) {
    ASSERT_FALSE(result.has_value());
    EXPECT_EQ(result.error().code(), ErrorCode::kInvalidArgument) << result.error().ToString();
    EXPECT_NE(result.error().context().find(words), std::string::npos)
        << "\"" << words << "\" not in: " << result.error().ToString();
  };
  expect_invalid(uffd->Register(At(mem, 1), kPage, UffdModes::kMissing),
                 "UFFDIO_REGISTER: range 0x");
  expect_invalid(uffd->Register(At(mem, 1), kPage, UffdModes::kMissing),
                 "is not aligned to the page size 4096");
  expect_invalid(uffd->Register(At(mem), 0, UffdModes::kMissing), "length is 0");
  expect_invalid(uffd->Register(At(mem), kPage + 1, UffdModes::kMissing),
                 "is not a multiple of the page size");
  expect_invalid(uffd->Register(At(mem), kPage, UffdModes::kNone), "invalid modes 0x0");
  expect_invalid(uffd->Register(At(mem), kPage, static_cast<UffdModes>(8)), "invalid modes 0x8");
  expect_invalid(uffd->Copy(HostVirtAddr(UINT64_MAX - kPage + 1), buf.data(), 2 * kPage),
                 "wraps around the address space");
  expect_invalid(uffd->Copy(At(mem), nullptr, kPage), "is not a buffer");
  expect_invalid(uffd->ZeroPage(At(mem), 0), "UFFDIO_ZEROPAGE: length is 0");
  expect_invalid(uffd->Continue(At(mem, 2048), kPage), "UFFDIO_CONTINUE: dst");
  expect_invalid(uffd->Poison(At(mem), 100), "UFFDIO_POISON: length 0x64");
  expect_invalid(uffd->Move(At(mem), At(mem, kPage + 8), kPage), "UFFDIO_MOVE: src");
  expect_invalid(uffd->Wake(At(mem), 0), "UFFDIO_WAKE");
  expect_invalid(uffd->WriteProtect(At(mem, 1), kPage, true), "UFFDIO_WRITEPROTECT");
  expect_invalid(uffd->Unregister(At(mem), 0), "UFFDIO_UNREGISTER");
  std::vector<UffdEvent> events;
  expect_invalid(uffd->ReadEvents(nullptr), "no output vector");
  expect_invalid(uffd->ReadEvents(&events, 0), "max_events 0");
  EXPECT_TRUE(events.empty());

  EXPECT_EQ(os.calls(Call::kIoctl), ioctls_before);  // nothing reached the kernel
  EXPECT_EQ(os.calls(Call::kRead), reads_before);
  EXPECT_FALSE(Resident(mem, 0));
  EXPECT_FALSE(Resident(mem, kPage));
}

TEST(UserfaultfdTest, KernelRefusalsAreErrorsThatNameTheRange) {
  Mapping registered = MustMap(kPage);
  Mapping unregistered = MustMap(kPage);
  auto uffd = MustCreate();
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(registered), kPage, UffdModes::kMissing).has_value());
  std::vector<uint8_t> content(kPage, 7);
  // ENOENT: no registered range there. An outcome (the VMM may have unmapped it meanwhile),
  // and nothing is installed.
  auto copy = uffd->Copy(At(unregistered), content.data(), kPage);
  ASSERT_TRUE(copy.has_value()) << copy.error().ToString();
  EXPECT_EQ(copy->outcome, Outcome::kNoMapping);
  EXPECT_EQ(copy->bytes, 0);
  EXPECT_FALSE(Resident(unregistered, 0));

  // Copying from memory that is not there fails without installing anything.
  const auto* unmapped = reinterpret_cast<const void*>(kPage);  // NOLINT(performance-no-int-to-ptr)
  auto bad_src = uffd->Copy(At(registered), unmapped, kPage);
  ASSERT_FALSE(bad_src.has_value());
  EXPECT_EQ(bad_src.error().sys_errno(), EFAULT);
  EXPECT_FALSE(Resident(registered, 0));
}

TEST(UserfaultfdTest, InstallOutcomesFromTheKernelAreNotErrors) {
  Mapping mem = MustMap(kPage);
  FaultInjectionOs os;
  auto uffd = MustCreate({.os = &os});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), kPage, UffdModes::kMissing).has_value());
  std::vector<uint8_t> content(kPage, 9);
  const std::pair<int, Outcome> cases[] = {
      {EEXIST, Outcome::kExists}, {EAGAIN, Outcome::kAgain}, {ESRCH, Outcome::kTaskGone}};
  for (const auto& [err, outcome] : cases) {
    os.FailNext(Call::kIoctl, err);
    auto progress = uffd->Copy(At(mem), content.data(), kPage);
    ASSERT_TRUE(progress.has_value()) << progress.error().ToString();
    EXPECT_EQ(progress->outcome, outcome) << UffdOutcomeName(progress->outcome);
    EXPECT_EQ(progress->bytes, 0);
  }
  os.FailNext(Call::kIoctl, ENOMEM);
  auto exhausted = uffd->ZeroPage(At(mem), kPage);
  ASSERT_FALSE(exhausted.has_value());
  EXPECT_EQ(exhausted.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_NE(exhausted.error().context().find("UFFDIO_ZEROPAGE [0x"), std::string::npos);
  EXPECT_FALSE(Resident(mem, 0));

  auto zeroed = uffd->ZeroPage(At(mem), kPage);  // the kernel itself, once nothing is injected
  ASSERT_TRUE(zeroed.has_value()) << zeroed.error().ToString();
  EXPECT_EQ(zeroed->outcome, Outcome::kDone);
  EXPECT_EQ(zeroed->bytes, static_cast<int64_t>(kPage));
}

// ---------------------------------------------------------------------------------------------
// Faults and their answers.

TEST(UserfaultfdTest, MissingFaultAnsweredWithCopy) {
  Mapping mem = MustMap(4 * kPage);
  auto uffd = MustCreate({.optional_features = kUffdFeatureThreadId});
  ASSERT_TRUE(uffd);
  auto ioctls = uffd->Register(At(mem), 4 * kPage, UffdModes::kMissing);
  ASSERT_TRUE(ioctls.has_value()) << ioctls.error().ToString();
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kCopy));
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kZeroPage));
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kWake));

  std::atomic<uint8_t> seen{0};
  std::atomic<pid_t> toucher_tid{0};
  BlockingCall toucher(&uffd, [&] {
    toucher_tid = gettid();
    seen = Load(mem, 2 * kPage + 7);
  });
  auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->address, At(mem, 2 * kPage));  // page aligned: no EXACT_ADDRESS
  EXPECT_EQ(fault->kind, PagefaultKind::kMissing);
  EXPECT_FALSE(fault->write);
  if (uffd->HasFeature(kUffdFeatureThreadId)) {
    EXPECT_EQ(fault->thread_id, static_cast<uint32_t>(toucher_tid.load()));
  } else {
    EXPECT_EQ(fault->thread_id, 0u);
  }
  std::vector<uint8_t> content(kPage);
  for (uint64_t i = 0; i < kPage; ++i) content[i] = static_cast<uint8_t>(i * 7 + 3);
  auto copied = uffd->Copy(fault->address, content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, Outcome::kDone);
  EXPECT_EQ(copied->bytes, static_cast<int64_t>(kPage));
  ASSERT_TRUE(toucher.Finish());
  EXPECT_EQ(seen.load(), content[7]);
  EXPECT_EQ(std::memcmp(mem.bytes() + 2 * kPage, content.data(), kPage), 0);

  // Copying onto the now-present page is an outcome, and changes nothing.
  std::vector<uint8_t> other(2 * kPage, 0xee);
  auto again = uffd->Copy(At(mem, 2 * kPage), other.data(), kPage);
  ASSERT_TRUE(again.has_value()) << again.error().ToString();
  EXPECT_EQ(again->outcome, Outcome::kExists);
  EXPECT_EQ(again->bytes, 0);
  EXPECT_EQ(std::memcmp(mem.bytes() + 2 * kPage, content.data(), kPage), 0);

  // A range that is partly present: the kernel installs the first page, stops at the present
  // one and reports the partial count with EAGAIN; the rest then reports EEXIST.
  auto partial = uffd->Copy(At(mem, kPage), other.data(), 2 * kPage);
  ASSERT_TRUE(partial.has_value()) << partial.error().ToString();
  EXPECT_EQ(partial->outcome, Outcome::kAgain);
  EXPECT_EQ(partial->bytes, static_cast<int64_t>(kPage));
  EXPECT_TRUE(PageFilledWith(mem, kPage, 0xee));
  auto rest = uffd->Copy(At(mem, kPage + partial->bytes), other.data(), kPage);
  ASSERT_TRUE(rest.has_value());
  EXPECT_EQ(rest->outcome, Outcome::kExists);
  EXPECT_EQ(rest->bytes, 0);
  EXPECT_EQ(std::memcmp(mem.bytes() + 2 * kPage, content.data(), kPage), 0);
}

TEST(UserfaultfdTest, ZeroPageAndTheWriteFlag) {
  Mapping mem = MustMap(2 * kPage);
  auto uffd = MustCreate();
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 2 * kPage, UffdModes::kMissing).has_value());
  BlockingCall writer(&uffd, [&] { Store(mem, kPage + 5, 9); });
  auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_TRUE(fault->write);
  EXPECT_EQ(fault->address, At(mem, kPage));
  auto zeroed = uffd->ZeroPage(At(mem), 2 * kPage);
  ASSERT_TRUE(zeroed.has_value()) << zeroed.error().ToString();
  EXPECT_EQ(zeroed->outcome, Outcome::kDone);
  EXPECT_EQ(zeroed->bytes, static_cast<int64_t>(2 * kPage));
  ASSERT_TRUE(writer.Finish());
  EXPECT_EQ(Load(mem, kPage + 5), 9);
  EXPECT_TRUE(PageFilledWith(mem, 0, 0));
  auto again = uffd->ZeroPage(At(mem), kPage);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->outcome, Outcome::kExists);
}

TEST(UserfaultfdTest, FullMinorTrapOnShmem) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureMinorShmem);
  UniqueFd memfd(memfd_create("minor", MFD_CLOEXEC));
  ASSERT_TRUE(memfd.valid()) << ErrnoText();
  ASSERT_EQ(ftruncate(memfd.get(), 4 * kPage), 0);
  // Page 1 has content in the file before anything is mapped; pages 2 and 3 have none.
  std::vector<uint8_t> content(kPage, 0x42);
  ASSERT_EQ(pwrite(memfd.get(), content.data(), kPage, kPage), static_cast<ssize_t>(kPage));
  auto mem = Mapping::Map(4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
  ASSERT_TRUE(mem.has_value()) << mem.error().ToString();
  auto uffd = MustCreate({.required_features = kUffdFeatureMinorShmem});
  ASSERT_TRUE(uffd);
  auto ioctls = uffd->Register(At(*mem), 4 * kPage, UffdModes::kMissing | UffdModes::kMinor);
  ASSERT_TRUE(ioctls.has_value()) << ioctls.error().ToString();
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kContinue));

  // In the page cache but not mapped: a MINOR fault, answered by CONTINUE.
  std::atomic<uint8_t> seen{0};
  {
    BlockingCall reader(&uffd, [&] { seen = Load(*mem, kPage + 9); });
    auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
    ASSERT_TRUE(fault.has_value());
    EXPECT_EQ(fault->kind, PagefaultKind::kMinor);
    EXPECT_EQ(fault->address, At(*mem, kPage));
    auto cont = uffd->Continue(At(*mem, kPage), kPage);
    ASSERT_TRUE(cont.has_value()) << cont.error().ToString();
    EXPECT_EQ(cont->outcome, Outcome::kDone);
    EXPECT_EQ(cont->bytes, static_cast<int64_t>(kPage));
    ASSERT_TRUE(reader.Finish());
    EXPECT_EQ(seen.load(), 0x42);
  }

  // Never written: the same registration traps it as MISSING. Write the content into the file,
  // then CONTINUE maps it -- the full minor trap.
  {
    BlockingCall reader(&uffd, [&] { seen = Load(*mem, 2 * kPage + 5); });
    auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
    ASSERT_TRUE(fault.has_value());
    EXPECT_EQ(fault->kind, PagefaultKind::kMissing);
    EXPECT_EQ(fault->address, At(*mem, 2 * kPage));
    std::vector<uint8_t> page2(kPage);
    for (uint64_t i = 0; i < kPage; ++i) page2[i] = static_cast<uint8_t>(i ^ 0x77);
    ASSERT_EQ(pwrite(memfd.get(), page2.data(), kPage, 2 * kPage), static_cast<ssize_t>(kPage));
    auto cont = uffd->Continue(At(*mem, 2 * kPage), kPage);
    ASSERT_TRUE(cont.has_value()) << cont.error().ToString();
    EXPECT_EQ(cont->outcome, Outcome::kDone);
    ASSERT_TRUE(reader.Finish());
    EXPECT_EQ(seen.load(), page2[5]);
    EXPECT_EQ(std::memcmp(mem->bytes() + 2 * kPage, page2.data(), kPage), 0);
  }

  // CONTINUE with nothing in the page cache is an error and maps nothing.
  auto empty = uffd->Continue(At(*mem, 3 * kPage), kPage);
  ASSERT_FALSE(empty.has_value());
  EXPECT_EQ(empty.error().sys_errno(), EFAULT) << empty.error().ToString();
  // Continuing a mapped page again is an outcome.
  auto twice = uffd->Continue(At(*mem, kPage), kPage);
  ASSERT_TRUE(twice.has_value()) << twice.error().ToString();
  EXPECT_EQ(twice->outcome, Outcome::kExists);
}

TEST(UserfaultfdTest, WakeReleasesAThreadLeftAsleep) {
  Mapping mem = MustMap(kPage);
  auto uffd = MustCreate();
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), kPage, UffdModes::kMissing).has_value());
  std::atomic<uint8_t> seen{0};
  BlockingCall reader(&uffd, [&] {
    std::this_thread::sleep_for(milliseconds(20));  // let the test thread reach poll() first
    seen = Load(mem, 100);
  });
  ASSERT_TRUE(Only<PagefaultEvent>(WaitEvents(*uffd)).has_value());
  std::vector<uint8_t> content(kPage, 0x61);
  auto copied = uffd->Copy(At(mem), content.data(), kPage, {.dont_wake = true});
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, Outcome::kDone);
  // Installed, but the reader sleeps on until woken.
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_FALSE(reader.done());
  auto info = uffd->Inspect();
  ASSERT_TRUE(info.has_value()) << info.error().ToString();
  EXPECT_EQ(info->blocked_faults, 1u);
  EXPECT_EQ(info->pending_faults, 0u);
  ASSERT_TRUE(uffd->Wake(At(mem), kPage));
  ASSERT_TRUE(reader.Finish());
  EXPECT_EQ(seen.load(), 0x61);
}

TEST(UserfaultfdTest, WriteProtectFault) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeaturePagefaultFlagWp);
  Mapping mem = MustMap(kPage);
  Store(mem, 0, 1);  // populated before registering
  auto uffd = MustCreate({.required_features = kUffdFeaturePagefaultFlagWp});
  ASSERT_TRUE(uffd);
  auto ioctls = uffd->Register(At(mem), kPage, UffdModes::kWriteProtect);
  ASSERT_TRUE(ioctls.has_value()) << ioctls.error().ToString();
  EXPECT_TRUE(HasUffdIoctl(*ioctls, UffdIoctl::kWriteProtect));
  ASSERT_TRUE(uffd->WriteProtect(At(mem), kPage, true));
  EXPECT_EQ(Load(mem, 0), 1);  // reads do not trap
  BlockingCall writer(&uffd, [&] { Store(mem, 0, 2); });
  auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->kind, PagefaultKind::kWriteProtect);
  EXPECT_TRUE(fault->write);
  EXPECT_EQ(fault->address, At(mem));
  EXPECT_EQ(Load(mem, 0), 1);  // the write waits
  EXPECT_FALSE(writer.done());
  ASSERT_TRUE(uffd->WriteProtect(At(mem), kPage, false));
  ASSERT_TRUE(writer.Finish());
  EXPECT_EQ(Load(mem, 0), 2);
}

TEST(UserfaultfdTest, PoisonDeliversSigbus) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeaturePoison);
  const pid_t child = StartChild([] {
    Mapping mem = MustMap(kPage);
    auto uffd = Userfaultfd::Create({.required_features = kUffdFeaturePoison});
    if (!uffd || !uffd->Register(At(mem), kPage, UffdModes::kMissing)) return 2;
    auto poisoned = uffd->Poison(At(mem), kPage);
    if (!poisoned || poisoned->outcome != Outcome::kDone) return 3;
    if (poisoned->bytes != static_cast<int64_t>(kPage)) return 4;
    (void)signal(SIGBUS, SIG_DFL);  // sanitizers catch SIGBUS; the test wants the kernel's verdict
    (void)Load(mem, 0);
    return 5;  // not reached: SIGBUS
  });
  const int status = WaitChild(child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit status " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
}

TEST(UserfaultfdTest, PoisonNeedsNoNegotiation) {
  // Firecracker's uffd negotiates only EVENT_REMOVE. The kernel accepts UFFDIO_POISON on it all
  // the same (the feature bit only advertises the ioctl), which is what lets a handler poison a
  // page it cannot supply instead of leaving the VM hanging.
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeaturePoison);
  Mapping mem = MustMap(kPage);
  auto uffd = MustCreate({.required_features = kUffdFeatureEventRemove});
  ASSERT_TRUE(uffd);
  EXPECT_FALSE(uffd->HasFeature(kUffdFeaturePoison));
  ASSERT_TRUE(uffd->Register(At(mem), kPage, UffdModes::kMissing).has_value());
  auto poisoned = uffd->Poison(At(mem), kPage);
  ASSERT_TRUE(poisoned.has_value()) << poisoned.error().ToString();
  EXPECT_EQ(poisoned->outcome, Outcome::kDone);
  // The poison is a marker, not a page: a later copy replaces it, and the page reads normally.
  std::vector<uint8_t> content(kPage, 0x4d);
  auto copy = uffd->Copy(At(mem), content.data(), kPage);
  ASSERT_TRUE(copy.has_value()) << copy.error().ToString();
  EXPECT_EQ(copy->outcome, Outcome::kDone);
  EXPECT_TRUE(PageFilledWith(mem, 0, 0x4d));
}

TEST(UserfaultfdTest, MoveTakesThePagesAway) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureMove);
  Mapping src = MustMap(2 * kPage);
  Mapping dst = MustMap(2 * kPage);
  for (uint64_t i = 0; i < 2 * kPage; ++i) Store(src, i, static_cast<uint8_t>(i % 251));
  auto uffd = MustCreate({.required_features = kUffdFeatureMove});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(dst), 2 * kPage, UffdModes::kMissing).has_value());
  auto moved = uffd->Move(At(dst), At(src), 2 * kPage);
  ASSERT_TRUE(moved.has_value()) << moved.error().ToString();
  EXPECT_EQ(moved->outcome, Outcome::kDone);
  EXPECT_EQ(moved->bytes, static_cast<int64_t>(2 * kPage));
  for (uint64_t i = 0; i < 2 * kPage; i += 397) {
    ASSERT_EQ(Load(dst, i), static_cast<uint8_t>(i % 251)) << i;
  }
  // Moved, not copied: the source is empty now (reads as fresh zero memory).
  EXPECT_FALSE(Resident(src, 0));
  EXPECT_TRUE(PageFilledWith(src, kPage, 0));

  // An empty source page is an error unless holes are allowed.
  Mapping dst2 = MustMap(kPage);
  ASSERT_TRUE(uffd->Register(At(dst2), kPage, UffdModes::kMissing).has_value());
  Mapping hole = MustMap(kPage);
  auto refused = uffd->Move(At(dst2), At(hole), kPage);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().sys_errno(), ENOENT) << refused.error().ToString();
  auto skipped = uffd->Move(At(dst2), At(hole), kPage, false, /*allow_src_holes=*/true);
  ASSERT_TRUE(skipped.has_value()) << skipped.error().ToString();
  EXPECT_EQ(skipped->outcome, Outcome::kDone);
  EXPECT_FALSE(Resident(dst2, 0));
}

TEST(UserfaultfdTest, TaskGoneAfterTheOwnerExits) {
  // The child registers memory, hands over its uffd and exits. The uffd outlives the process
  // whose memory it covers; installing into it then reports ESRCH (the kernel finds no live mm),
  // which is kTaskGone.
  void* child_mem =
      mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(child_mem, MAP_FAILED);
  Mapping parent_copy(child_mem, kPage);
  SocketPair sockets;
  const pid_t child = StartChild([&] {
    auto uffd = Userfaultfd::Create();
    if (!uffd || !uffd->Register(At(parent_copy), kPage, UffdModes::kMissing)) return 2;
    return SendFd(sockets.child.get(), uffd->fd()) ? 0 : 3;
  });
  auto uffd = Userfaultfd::Adopt(ReceiveFd(sockets.parent.get()));
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  const int status = WaitChild(child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  std::vector<uint8_t> content(kPage, 1);
  auto copied = uffd->Copy(At(parent_copy), content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, Outcome::kTaskGone);
  EXPECT_EQ(copied->bytes, 0);
  auto zero = uffd->ZeroPage(At(parent_copy), kPage);
  ASSERT_TRUE(zero.has_value()) << zero.error().ToString();
  EXPECT_EQ(zero->outcome, Outcome::kTaskGone);
  EXPECT_FALSE(Resident(parent_copy, 0));  // the parent's memory was never the target
}

// ---------------------------------------------------------------------------------------------
// Non-fault events.

TEST(UserfaultfdTest, RemoveEventAndEagainWhileItIsUnread) {
  Mapping mem = MustMap(8 * kPage);
  auto uffd = MustCreate({.required_features = kUffdFeatureEventRemove});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 8 * kPage, UffdModes::kMissing).has_value());
  std::vector<uint8_t> content(8 * kPage, 0x11);
  auto filled = uffd->Copy(At(mem), content.data(), 8 * kPage);
  ASSERT_TRUE(filled.has_value() && filled->outcome == Outcome::kDone);
  // madvise waits until its REMOVE event has been read.
  std::atomic<int> madvise_rc{-2};
  BlockingCall balloon(&uffd, [&] { madvise_rc = madvise(mem.data(), 4 * kPage, MADV_DONTNEED); });
  pollfd pfd{uffd->fd(), POLLIN, 0};
  ASSERT_EQ(poll(&pfd, 1, static_cast<int>(kDeadline.count())), 1);
  // While the REMOVE is unread, installs report EAGAIN: an outcome, with nothing installed.
  auto blocked = uffd->Copy(At(mem), content.data(), kPage);
  ASSERT_TRUE(blocked.has_value()) << blocked.error().ToString();
  EXPECT_EQ(blocked->outcome, Outcome::kAgain);
  EXPECT_EQ(blocked->bytes, 0);
  auto remove = Only<RemoveEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(remove.has_value());
  EXPECT_EQ(remove->start, At(mem));
  EXPECT_EQ(remove->end, At(mem, 4 * kPage));
  ASSERT_TRUE(balloon.Finish());
  EXPECT_EQ(madvise_rc.load(), 0);
  // Drained: the retry goes through, and the other removed pages are empty again.
  std::vector<uint8_t> fresh(kPage, 0x22);
  auto retried = uffd->Copy(At(mem), fresh.data(), kPage);
  ASSERT_TRUE(retried.has_value()) << retried.error().ToString();
  EXPECT_EQ(retried->outcome, Outcome::kDone);
  EXPECT_TRUE(PageFilledWith(mem, 0, 0x22));
  auto zeroed = uffd->ZeroPage(At(mem, kPage), 3 * kPage);
  ASSERT_TRUE(zeroed.has_value());
  EXPECT_EQ(zeroed->outcome, Outcome::kDone);
  EXPECT_TRUE(PageFilledWith(mem, 4 * kPage, 0x11));  // outside the removed range
}

TEST(UserfaultfdTest, UnmapEvent) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureEventUnmap);
  Mapping mem = MustMap(4 * kPage);  // declared first: the uffd closes before it is unmapped
  auto uffd = MustCreate({.required_features = kUffdFeatureEventUnmap});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 4 * kPage, UffdModes::kMissing).has_value());
  std::atomic<int> munmap_rc{-2};
  BlockingCall unmapper(&uffd, [&] { munmap_rc = munmap(mem.bytes() + kPage, 2 * kPage); });
  auto unmap = Only<UnmapEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(unmap.has_value());
  EXPECT_EQ(unmap->start, At(mem, kPage));
  EXPECT_EQ(unmap->end, At(mem, 3 * kPage));
  ASSERT_TRUE(unmapper.Finish());
  EXPECT_EQ(munmap_rc.load(), 0);
}

TEST(UserfaultfdTest, RemapEvent) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureEventRemap);
  Mapping target = MustMap(2 * kPage);  // reserved destination; owns the moved range afterwards
  Mapping mem = MustMap(2 * kPage);
  auto uffd = MustCreate({.required_features = kUffdFeatureEventRemap});
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 2 * kPage, UffdModes::kMissing).has_value());
  const HostVirtAddr old_address = At(mem);
  std::atomic<void*> moved{nullptr};
  BlockingCall mover(&uffd, [&] {
    moved = mremap(mem.data(), 2 * kPage, 2 * kPage, MREMAP_MAYMOVE | MREMAP_FIXED, target.data());
  });
  auto remap = Only<RemapEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(mover.Finish());
  ASSERT_EQ(moved.load(), target.data()) << ErrnoText();
  (void)mem.release();  // now part of `target`
  ASSERT_TRUE(remap.has_value());
  EXPECT_EQ(remap->from, old_address);
  EXPECT_EQ(remap->to, At(target));
  EXPECT_EQ(remap->length, 2 * kPage);
  // The registration moved with the memory: a touch there still traps.
  BlockingCall reader(&uffd, [&] { (void)Load(target, 0); });
  auto fault = Only<PagefaultEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->address, At(target));
  ASSERT_TRUE(uffd->ZeroPage(At(target), kPage).has_value());
  ASSERT_TRUE(reader.Finish());
}

TEST(UserfaultfdTest, ForkEventHandsOverTheChildsUffd) {
  SKIP_UNLESS_KERNEL_OFFERS(kUffdFeatureEventFork);
  Mapping mem = MustMap(kPage);
  auto created = Userfaultfd::Create({.required_features = kUffdFeatureEventFork});
  if (!created && created.error().code() == ErrorCode::kPermissionDenied) {
    GTEST_SKIP() << created.error().ToString();  // needs CAP_SYS_PTRACE
  }
  ASSERT_TRUE(created.has_value()) << created.error().ToString();
  std::optional<Userfaultfd> uffd(std::move(*created));
  ASSERT_TRUE(uffd->Register(At(mem), kPage, UffdModes::kMissing).has_value());
  std::atomic<pid_t> child{-1};
  // fork() returns in the parent once the FORK event has been read.
  BlockingCall forker(&uffd, [&] {
    // The child's copy of the range is registered with the child's uffd: its read waits for
    // this test to serve the fault through the uffd the FORK event carries.
    child = StartChild([&] { return Load(mem, 0) == 0x3c ? 0 : 1; });
  });
  auto fork_event = Only<ForkEvent>(WaitEvents(*uffd));
  ASSERT_TRUE(forker.Finish());
  ASSERT_TRUE(fork_event.has_value());
  ASSERT_TRUE(fork_event->child_uffd.valid());
  auto child_uffd = Userfaultfd::Adopt(std::move(fork_event->child_uffd), uffd->features());
  ASSERT_TRUE(child_uffd.has_value()) << child_uffd.error().ToString();
  auto fault = Only<PagefaultEvent>(WaitEvents(*child_uffd));
  ASSERT_TRUE(fault.has_value());
  EXPECT_EQ(fault->address, At(mem));
  std::vector<uint8_t> content(kPage, 0x3c);
  auto copied = child_uffd->Copy(At(mem), content.data(), kPage);
  ASSERT_TRUE(copied.has_value()) << copied.error().ToString();
  EXPECT_EQ(copied->outcome, Outcome::kDone);
  const int status = WaitChild(child.load());
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_FALSE(Resident(mem, 0));  // the parent's page was never filled
}

TEST(UserfaultfdTest, BatchedReadReturnsSeveralEvents) {
  Mapping mem = MustMap(4 * kPage);
  auto uffd = MustCreate();
  ASSERT_TRUE(uffd);
  ASSERT_TRUE(uffd->Register(At(mem), 4 * kPage, UffdModes::kMissing).has_value());
  std::vector<std::unique_ptr<BlockingCall>> readers;
  for (uint64_t i = 0; i < 4; ++i) {
    readers.push_back(
        std::make_unique<BlockingCall>(&uffd, [&mem, i] { (void)Load(mem, i * kPage); }));
  }
  ASSERT_TRUE(WaitPendingFaults(*uffd, 4));
  std::vector<UffdEvent> events;
  auto first = uffd->ReadEvents(&events, 3);  // one read(2), capped at 3
  ASSERT_TRUE(first.has_value()) << first.error().ToString();
  EXPECT_EQ(*first, 3u);
  auto second = uffd->ReadEvents(&events);
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  EXPECT_EQ(*second, 1u);
  auto none = uffd->ReadEvents(&events);  // non-blocking and drained
  ASSERT_TRUE(none.has_value()) << none.error().ToString();
  EXPECT_EQ(*none, 0u);
  ASSERT_EQ(events.size(), 4u);
  std::set<uint64_t> addresses;
  for (const UffdEvent& event : events) {
    ASSERT_TRUE(std::holds_alternative<PagefaultEvent>(event));
    addresses.insert(std::get<PagefaultEvent>(event).address.value());
  }
  EXPECT_EQ(addresses,
            (std::set<uint64_t>{At(mem).value(), At(mem, kPage).value(), At(mem, 2 * kPage).value(),
                                At(mem, 3 * kPage).value()}));
  auto info = uffd->Inspect();
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->pending_faults, 0u);
  EXPECT_EQ(info->blocked_faults, 4u);
  ASSERT_TRUE(uffd->ZeroPage(At(mem), 4 * kPage).has_value());
  for (auto& reader : readers) EXPECT_TRUE(reader->Finish());
}

// Hands ReadEvents a batch the kernel would never produce.
class ScriptedReadOs : public OsWrapper {
 public:
  void Script(std::vector<uffd_msg> messages, size_t bytes) {
    messages_ = std::move(messages);
    bytes_ = bytes;
  }
  ssize_t Read(int fd, void* buf, size_t count) override {
    if (messages_.empty()) return OsWrapper::Read(fd, buf, count);
    const size_t n = std::min(count, bytes_);
    std::memcpy(buf, messages_.data(), n);
    messages_.clear();
    return static_cast<ssize_t>(n);
  }

 private:
  std::vector<uffd_msg> messages_;
  size_t bytes_ = 0;
};

TEST(UserfaultfdTest, UnknownEventsAndTornMessagesAreProtocolErrors) {
  ScriptedReadOs os;
  auto uffd = MustCreate({.os = &os});
  ASSERT_TRUE(uffd);
  int pipe_fds[2];
  ASSERT_EQ(pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd write_end(pipe_fds[1]);
  std::vector<uffd_msg> messages(3);
  std::memset(messages.data(), 0, messages.size() * sizeof(uffd_msg));
  messages[0].event = UFFD_EVENT_PAGEFAULT;
  messages[0].arg.pagefault.address = 0x10000;
  messages[1].event = UFFD_EVENT_FORK;  // carries a descriptor that must not leak
  messages[1].arg.fork.ufd = static_cast<uint32_t>(pipe_fds[0]);
  messages[2].event = 0x7f;
  os.Script(messages, 3 * sizeof(uffd_msg));
  std::vector<UffdEvent> events(1);  // what the caller already had stays as it was
  auto read = uffd->ReadEvents(&events);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kProtocolError);
  EXPECT_NE(read.error().context().find("unknown event type 0x7f in message 2 of 3"),
            std::string::npos)
      << read.error().ToString();
  EXPECT_EQ(events.size(), 1u);
  EXPECT_EQ(fcntl(pipe_fds[0], F_GETFD), -1);
  EXPECT_EQ(errno, EBADF);

  os.Script(messages, sizeof(uffd_msg) + 8);
  auto torn = uffd->ReadEvents(&events);
  ASSERT_FALSE(torn.has_value());
  EXPECT_EQ(torn.error().code(), ErrorCode::kProtocolError);
  EXPECT_NE(torn.error().context().find("40 bytes"), std::string::npos) << torn.error().ToString();
  EXPECT_EQ(events.size(), 1u);
}

}  // namespace
}  // namespace guestmem
