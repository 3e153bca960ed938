// The fault handler against what a VM can do to its own memory while it is being restored —
// balloon storms racing with fault-around and fault-all, munmap with faults queued, mremap, fork,
// write protection — and against VMs that misbehave (faults outside their regions, exits nobody
// reports, a fault-all that must not stall the others). Every byte read is checked.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/fault_injection_os.h"
#include "guestmem/event_sequencer.h"
#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_tracker.h"
#include "guestmem/unique_fd.h"
#include "guestmem/userfault_bitmap.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/working_set.h"
#include "testutil/error_code.h"
#include "testutil/snapshot_file.h"
#include "testutil/test_vm.h"

namespace guestmem {
namespace {

using namespace std::chrono_literals;
using testutil::AllZero;
using testutil::ChildVmOptions;
using testutil::ClosedWatch;
using testutil::FixedWindows;
using testutil::ForkVm;
using testutil::MapAnonymousVm;
using testutil::OpenSource;
using testutil::QuickLiveness;
using testutil::ReceiveVm;
using testutil::Serve;
using testutil::SnapshotFile;
using testutil::StartEngine;
using testutil::StatsWhen;
using testutil::TestVm;
using testutil::VerifyAll;
using testutil::WaitChild;
using testutil::WaitUntil;

size_t OpenFds() {
  return static_cast<size_t>(std::distance(std::filesystem::directory_iterator("/proc/self/fd"),
                                           std::filesystem::directory_iterator{}));
}

// Sends or waits for one byte: the tests' way of sequencing a child VM. Hear gives up (0) after
// a generous deadline, so that a child that died or hung fails the test instead of hanging it.
void Tell(int sock, char c = 'x') { ASSERT_EQ(write(sock, &c, 1), 1); }
char Hear(int sock, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  pollfd pfd{sock, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(timeout.count())) != 1) return 0;
  char c = 0;
  return read(sock, &c, 1) == 1 ? c : 0;
}

struct SocketPair {
  SocketPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    parent.reset(sv[0]);
    child.reset(sv[1]);
  }
  UniqueFd parent;
  UniqueFd child;
};

// --- the balloon racing with fault-around and fault-all -----------------------------------------

// Guest memory for the balloon race: anonymous memory served by copy, or a shmem guest memory
// file in the full minor trap.
struct BalloonVm {
  std::optional<TestVm> vm;
  std::shared_ptr<MemoryFile> file;
  std::optional<MemoryMapping> mapping;
  uint8_t* base = nullptr;
};

struct BalloonCase {
  const char* name;
  FillMode fill;
  bool minor_trap;
};

class BalloonRaceTest : public ::testing::TestWithParam<BalloonCase> {};

// Two threads share each 64 KiB window: one balloons pages 0-7 and reads them, the other
// balloons pages 8-15 and reads page 15, whose fault-around (or fill) covers pages 0-7.
// Whatever the interleaving of REMOVE events, installs and the kernel's zaps, a removed page reads
// zero until written: the snapshot's content never comes back.

TEST_P(BalloonRaceTest, RemovedPagesNeverReadSnapshotBytes) {
  constexpr uint64_t kWindows = 32;
  constexpr uint64_t kWindowPages = kDefaultFaultAroundBytes / kPageSize4K;
  constexpr int kRounds = 400;
  SnapshotFile snapshot(kWindows * kWindowPages);  // every page is data
  FaultHandlerOptions options;
  options.fill = GetParam().fill;
  auto engine = StartEngine(2);
  BalloonVm b;
  if (GetParam().minor_trap) {
    auto file = MemoryFile::Create({.size_bytes = snapshot.size()});
    ASSERT_TRUE(file.has_value()) << file.error().ToString();
    b.file = *file;
    auto mapping = b.file->Map();
    ASSERT_TRUE(mapping.has_value()) << mapping.error().ToString();
    b.mapping.emplace(std::move(*mapping));
    auto uffd =
        Userfaultfd::Create({.required_features = kUffdFeatureEventRemove | kUffdFeatureMinorShmem |
                                                  kUffdFeatureMissingShmem});
    if (!uffd && uffd.error().code() == ErrorCode::kUnsupported) {
      GTEST_SKIP() << uffd.error().ToString();
    }
    ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
    ASSERT_TRUE(uffd->Register(b.mapping->host_address(), snapshot.size(),
                               UffdModes::kMissing | UffdModes::kMinor));
    auto layout = GuestLayout::Create(
        {GuestRegion{GuestPhysAddr(0), snapshot.size(), FileOffset(0), b.mapping->host_address()}});
    ASSERT_TRUE(layout.has_value());
    options.mode = InstallMode::kMinorTrap;
    options.memory_file = b.file;
    auto handler =
        FaultHandler::Create(std::move(*uffd), std::move(*layout), OpenSource(snapshot), options);
    ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
    ASSERT_TRUE(engine->AddSpace(std::move(*handler)).has_value());
    b.base = reinterpret_cast<uint8_t*>(b.mapping->bytes());
  } else {
    b.vm.emplace(MapAnonymousVm({snapshot.size()}));
    b.base = b.vm->PageAt(0);
    Serve(*engine, *b.vm, OpenSource(snapshot), options);
  }
  auto page = [&](uint64_t p) { return b.base + p * kPageSize4K; };

  std::atomic<uint64_t> stale{0};
  std::atomic<uint64_t> checks{0};
  std::mutex first_mu;
  std::string first;
  auto check_zero = [&](uint64_t p) {
    checks.fetch_add(1, std::memory_order_relaxed);
    if (AllZero(page(p), kPageSize4K)) return;
    if (stale.fetch_add(1) == 0) {
      std::lock_guard lock(first_mu);
      first = snapshot.CheckPage(p, page(p)).empty()
                  ? "page " + std::to_string(p) + " came back with the snapshot's content"
                  : "page " + std::to_string(p) + " is neither zero nor the snapshot's";
    }
  };
  auto balloon = [&](uint64_t first_page, uint64_t count) {
    ASSERT_EQ(madvise(page(first_page), count * kPageSize4K, MADV_DONTNEED), 0);
  };
  std::thread low([&] {
    for (int round = 0; round < kRounds; ++round) {
      for (uint64_t w = 0; w < kWindows; ++w) {
        balloon(w * kWindowPages, 8);
        for (uint64_t p = w * kWindowPages; p < w * kWindowPages + 8; ++p) check_zero(p);
      }
    }
  });
  std::thread high([&] {
    for (int round = 0; round < kRounds; ++round) {
      for (uint64_t w = 0; w < kWindows; ++w) {
        balloon(w * kWindowPages + 8, 8);
        check_zero(w * kWindowPages + kWindowPages - 1);
      }
    }
  });
  low.join();
  high.join();
  EXPECT_EQ(stale.load(), 0u) << "of " << checks.load() << " checks; first: " << first;
  EXPECT_EQ(checks.load(), kRounds * kWindows * 9);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, BalloonRaceTest,
    ::testing::Values(BalloonCase{"copy", FillMode::kNone, false},
                      BalloonCase{"copy_fault_all", FillMode::kAtFirstFault, false},
                      BalloonCase{"copy_background_fill", FillMode::kBackground, false},
                      BalloonCase{"minor_trap", FillMode::kNone, true},
                      BalloonCase{"minor_trap_fault_all", FillMode::kAtFirstFault, true},
                      BalloonCase{"minor_trap_background_fill", FillMode::kBackground, true}),
    [](const auto& param) { return std::string(param.param.name); });

// The rule that keeps the balloon race above safe, shown deterministically: a page whose
// snapshot content was served, then dropped by the kernel with no REMOVE event to say so (here a
// uffd without EVENT_REMOVE; in the race, the zap of a REMOVE that was read before an install
// landed), reads zero afterwards, as discarded anonymous memory does — never the snapshot again.
TEST(FaultHandlerEventsTest, APageDroppedAfterItWasServedReadsZeroNotTheSnapshotAgain) {
  SnapshotFile snapshot(64);
  TestVm vm = MapAnonymousVm({snapshot.size()}, kPageSize4K, 0, UffdModes::kMissing,
                             /*required_features=*/0);
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), FixedWindows());
  ASSERT_EQ(snapshot.CheckPage(5, vm.PageAt(5)), "");
  vm.PageAt(5)[0] = 1;  // the guest writes it
  ASSERT_EQ(madvise(vm.PageAt(0), 16 * kPageSize4K, MADV_DONTNEED), 0);
  for (uint64_t p = 0; p < 16; ++p) {
    EXPECT_TRUE(AllZero(vm.PageAt(p), kPageSize4K)) << "page " << p << " came back";
  }
  for (uint64_t p = 16; p < 64; ++p) EXPECT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.pages_installed() >= 64 + 16; });
  EXPECT_EQ(stats.bytes_read, 64 * kPageSize4K);  // every page read from the snapshot once only
}

// After the balloon, a fault in a removed window gets the whole window's removed pages as zeros
// at once, not one page per fault.
TEST(FaultHandlerEventsTest, RemovedPagesComeBackAsZerosAWindowPerFault) {
  SnapshotFile snapshot(64);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), FixedWindows());
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  const FaultStats before =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.pages_installed() >= 64; });
  ASSERT_EQ(madvise(vm.PageAt(16), 16 * kPageSize4K, MADV_DONTNEED), 0);
  for (uint64_t p = 16; p < 32; ++p) ASSERT_TRUE(AllZero(vm.PageAt(p), kPageSize4K)) << p;
  const FaultStats after = StatsWhen(*engine, id, [&](const FaultStats& s) {
    return s.pages_installed() >= before.pages_installed() + 16;
  });
  EXPECT_EQ(after.faults_missing - before.faults_missing, 1u);
  EXPECT_EQ(after.pages_zeroed - before.pages_zeroed, 16u);
  EXPECT_EQ(after.bytes_read, before.bytes_read);  // nothing read again from the snapshot
}

// The page's poison stays: a fault on it that was queued before it was poisoned (another thread
// touched it too) is never answered with a mapping, which would replace the poison with zeros.
TEST(FaultHandlerEventsTest, ALateFaultOnAPoisonedPageKeepsItPoisoned) {
  if (!(Userfaultfd::Probe().value_or(UffdKernelInfo{}).features & kUffdFeaturePoison)) {
    GTEST_SKIP() << "no UFFDIO_POISON";
  }
  SnapshotFile snapshot(64);
  SocketPair sockets;
  const int sock = sockets.child.get();
  pid_t child = ForkVm(sock, 64, [&](volatile uint8_t* mem, Userfaultfd& uffd) {
    static thread_local sigjmp_buf* env = nullptr;
    struct sigaction action = {};
    action.sa_handler = [](int) { siglongjmp(*env, 1); };
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, nullptr);
    std::atomic<int> sigbus{0};
    std::atomic<int> read{0};
    // Each toucher writes a byte of its own (the same page, never the same byte).
    auto touch = [&](bool write, uint64_t byte) {
      sigjmp_buf here;
      env = &here;
      if (sigsetjmp(here, 1) == 0) {
        if (write) {
          mem[5 * kPageSize4K + byte] = 1;
        } else {
          (void)mem[5 * kPageSize4K];
        }
        ++read;
      } else {
        ++sigbus;
      }
    };
    // Two write faults queued on one page: the later would be answered with zeros to write.
    std::thread a(touch, true, 8), b(touch, true, 16);
    if (!WaitUntil([&] { return uffd.Inspect().value_or(UffdFdInfo{}).pending_faults >= 2; })) {
      return 10;
    }
    Tell(sock, 'g');
    a.join();
    b.join();
    if (Hear(sock) != 'c') return 11;
    touch(false, 0);  // after both faults were served: still poisoned
    return sigbus.load() == 3 && read.load() == 0 ? 0 : 20 + read.load();
  });
  FaultInjectionOs broken;
  broken.FailAlways(FaultInjectionOs::Call::kPread, EIO);
  auto handler = ReceiveVm(sockets.parent.get(), OpenSource(snapshot, &broken));
  ASSERT_NE(handler, nullptr);
  // One fault per turn: the second fault is served in a later turn than the poison.
  FaultEngineOptions options = QuickLiveness();
  options.budget.faults = 1;
  auto engine = StartEngine(options);
  ASSERT_EQ(Hear(sockets.parent.get()), 'g');
  auto id = engine->AddSpace(std::move(handler));
  ASSERT_TRUE(id.has_value());
  const FaultStats stats =
      StatsWhen(*engine, *id, [](const FaultStats& s) { return s.faults_missing >= 2; });
  EXPECT_GE(stats.faults_missing, 2u);
  EXPECT_EQ(stats.pages_poisoned, 1u);
  Tell(sockets.parent.get(), 'c');
  const std::optional<int> status = WaitChild(child);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
      << "exit " << (WIFEXITED(*status) ? WEXITSTATUS(*status) : -1)
      << " (20 + reads that found no poison)";
  EXPECT_EQ(engine->Stats(*id).value_or(FaultStats{}).pages_installed(), 0u);
}

// --- munmap, mremap, fork, write protection ------------------------------------------------------

// The VM replaces part of its memory (munmap, here by mapping over it) while a thread's fault
// there is queued: installing there finds no mapping (ENOENT). The thread is woken (it then finds
// the new memory) and the rest of the VM goes on being served, byte for byte.
TEST(FaultHandlerEventsTest, UnmappedWhileAFaultIsQueuedWakesAndServesTheRest) {
  constexpr uint64_t kPages = 512;
  SnapshotFile snapshot(kPages, [](uint64_t p) { return p % 11 == 4; });
  SocketPair sockets;
  pid_t child = ForkVm(sockets.child.get(), kPages, [&](volatile uint8_t* mem, Userfaultfd& uffd) {
    // A thread faults on page 10 of the first half; nobody serves yet.
    std::thread early([&] { (void)mem[10 * kPageSize4K]; });
    if (!WaitUntil([&] { return uffd.Inspect().value_or(UffdFdInfo{}).pending_faults > 0; })) {
      return 10;
    }
    // The first half goes away (no UNMAP event is asked for, as with Firecracker): fresh memory
    // that no uffd covers takes its place.
    void* fresh = mmap(const_cast<uint8_t*>(mem), kPages / 2 * kPageSize4K, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (fresh == MAP_FAILED) return 11;
    Tell(sockets.child.get());  // now serve
    early.join();
    // The rest of guest memory is served as if nothing happened.
    for (uint64_t p = kPages / 2; p < kPages; ++p) {
      const bool hole = p % 11 == 4;
      for (uint64_t i = 0; i < kPageSize4K; i += 512) {
        const uint8_t want = hole ? 0 : testutil::SnapshotByte(p, i);
        if (mem[p * kPageSize4K + i] != want) return 12;
      }
    }
    return 0;
  });
  auto handler = ReceiveVm(sockets.parent.get(), OpenSource(snapshot));
  ASSERT_NE(handler, nullptr);
  auto engine = StartEngine(QuickLiveness());
  ASSERT_EQ(Hear(sockets.parent.get()), 'x');
  auto id = engine->AddSpace(std::move(handler));
  ASSERT_TRUE(id.has_value());
  const std::optional<int> status = WaitChild(child);
  ASSERT_TRUE(status.has_value()) << "the VM hung: the rest of its memory was not served";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

TEST(FaultHandlerEventsTest, RemapFollowsARegionThatMovedWhole) {
  SnapshotFile snapshot(256, [](uint64_t p) { return p % 6 == 0; });
  TestVm vm = MapAnonymousVm({snapshot.size()}, kPageSize4K, kUffdFeatureEventRemap);
  if (!vm.uffd.HasFeature(kUffdFeatureEventRemap)) GTEST_SKIP() << "no UFFD_FEATURE_EVENT_REMAP";
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));
  for (uint64_t p = 0; p < 64; ++p) ASSERT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  // Move the whole region elsewhere; the handler learns it from the REMAP event.
  auto target = Mapping::Map(snapshot.size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_TRUE(target.has_value());
  void* to = mremap(vm.regions[0].data(), snapshot.size(), snapshot.size(),
                    MREMAP_MAYMOVE | MREMAP_FIXED, target->data());
  ASSERT_EQ(to, target->data()) << strerror(errno);
  vm.regions[0].release();  // its pages now live at `to`, owned by `target`
  vm.regions[0] = std::move(*target);
  // Pages served before moved with the region; the others are served at the new address.
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  // The handler counts an install just after the ioctl that woke the thread: wait for it.
  const FaultStats stats = StatsWhen(*engine, id, [&](const FaultStats& s) {
    return s.events_remap >= 1 && s.pages_installed() >= snapshot.pages();
  });
  EXPECT_EQ(stats.events_remap, 1u);
  EXPECT_EQ(stats.pages_installed(), snapshot.pages());
}

TEST(FaultHandlerEventsTest, UnmappedRangeComesBackAsZeros) {
  SnapshotFile snapshot(256);
  TestVm vm = MapAnonymousVm({snapshot.size()}, kPageSize4K, kUffdFeatureEventUnmap);
  if (!vm.uffd.HasFeature(kUffdFeatureEventUnmap)) GTEST_SKIP() << "no UFFD_FEATURE_EVENT_UNMAP";
  UniqueFd uffd_copy(dup(vm.uffd.fd()));
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));
  uint8_t* range = vm.PageAt(128);
  ASSERT_EQ(snapshot.CheckPage(128, range), "");
  // Unmap pages 128..191, then map fresh memory there and register it with the same uffd: the
  // snapshot's content went with the old mapping, so the new memory reads zero.
  ASSERT_EQ(munmap(range, 64 * kPageSize4K), 0);
  ASSERT_EQ(mmap(range, 64 * kPageSize4K, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
            range);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(range), 64 * kPageSize4K};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(ioctl(uffd_copy.get(), UFFDIO_REGISTER, &reg), 0) << strerror(errno);
  for (uint64_t p = 128; p < 192; ++p) EXPECT_TRUE(AllZero(vm.PageAt(p), kPageSize4K)) << p;
  for (uint64_t p = 0; p < 128; ++p) EXPECT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  const FaultStats stats =
      StatsWhen(*engine, id, [&](const FaultStats& s) { return s.events_unmap >= 1; });
  EXPECT_EQ(stats.events_unmap, 1u);
}

TEST(FaultHandlerEventsTest, WriteProtectFaultsAreUnprotected) {
  SnapshotFile snapshot(64);
  TestVm vm = MapAnonymousVm({snapshot.size()}, kPageSize4K, kUffdFeaturePagefaultFlagWp,
                             UffdModes::kMissing | UffdModes::kWriteProtect);
  if (!vm.uffd.HasFeature(kUffdFeaturePagefaultFlagWp)) GTEST_SKIP() << "no UFFD_FEATURE_WP";
  UniqueFd uffd_copy(dup(vm.uffd.fd()));
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));
  ASSERT_EQ(snapshot.CheckPage(3, vm.PageAt(3)), "");
  uffdio_writeprotect wp{};
  wp.range = {reinterpret_cast<uint64_t>(vm.PageAt(3)), kPageSize4K};
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  ASSERT_EQ(ioctl(uffd_copy.get(), UFFDIO_WRITEPROTECT, &wp), 0) << strerror(errno);
  vm.PageAt(3)[100] = 0xab;  // traps as a write-protect fault; the handler lets it through
  EXPECT_EQ(vm.PageAt(3)[100], 0xab);
  const FaultStats stats =
      StatsWhen(*engine, id, [&](const FaultStats& s) { return s.faults_write_protect >= 1; });
  EXPECT_EQ(stats.faults_write_protect, 1u);
}

// A VM that forks (UFFD_FEATURE_EVENT_FORK): the child's copy of guest memory is served by a
// space of its own, starting from what the parent had; each child verifies its memory; children
// that exit are freed, spaces and descriptors alike, while the parent lives on.
TEST(FaultHandlerEventsTest, ForkedChildrenAreServedAndFreedWhenTheyExit) {
  constexpr uint64_t kPages = 128;
  constexpr int kChildren = 50;
  SnapshotFile snapshot(kPages, [](uint64_t p) { return p % 9 == 5; });
  SocketPair sockets;
  const int sock = sockets.child.get();
  ChildVmOptions options;
  options.features = kUffdFeatureEventRemove | kUffdFeatureEventFork;
  pid_t vm = ForkVm(
      sock, kPages,
      [&](volatile uint8_t* mem, Userfaultfd&) {
        auto verify = [&](uint64_t first, uint64_t end) {
          for (uint64_t p = first; p < end; ++p) {
            for (uint64_t i = 0; i < kPageSize4K; i += 256) {
              const uint8_t want = p % 9 == 5 ? 0 : testutil::SnapshotByte(p, i);
              if (mem[p * kPageSize4K + i] != want) return false;
            }
          }
          return true;
        };
        if (!verify(0, kPages / 2)) return 20;  // the first half is served before any fork
        if (Hear(sock) != 'g') return 21;
        int failed = 0;
        for (int i = 0; i < kChildren; ++i) {
          const pid_t child = fork();
          if (child == 0) _exit(verify(0, kPages) ? 0 : 1);
          int status = 0;
          if (waitpid(child, &status, 0) != child || !WIFEXITED(status) ||
              WEXITSTATUS(status) != 0) {
            ++failed;
          }
        }
        Tell(sock, failed == 0 ? 'k' : 'f');
        Hear(sock);  // live on until the test has looked
        return 0;
      },
      options);
  auto handler = ReceiveVm(sockets.parent.get(), OpenSource(snapshot));
  ASSERT_NE(handler, nullptr);
  ClosedWatch children;
  auto engine = StartEngine(QuickLiveness());
  ASSERT_TRUE(engine->AddSpace(std::move(handler), children.Callback()).has_value());
  // Descriptors with only the parent VM's space served.
  const size_t fds_before = OpenFds();
  Tell(sockets.parent.get(), 'g');
  EXPECT_EQ(Hear(sockets.parent.get()), 'k') << "a forked child read a wrong byte";
  // Every child exited: each of their spaces ends by itself and frees its uffd.
  EXPECT_TRUE(WaitUntil([&] { return engine->space_count() == 1; }))
      << engine->space_count() << " spaces left";
  EXPECT_TRUE(WaitUntil([&] { return OpenFds() <= fds_before; }))
      << OpenFds() << " descriptors open, " << fds_before << " before the forks";
  EXPECT_EQ(children.closed(), kChildren);
  EXPECT_EQ(testutil::ErrorCodeOf(children.why()), ErrorCode::kPeerGone);
  Tell(sockets.parent.get());
  const std::optional<int> status = WaitChild(vm);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

// --- a successor takes a VM over ---------------------------------------------------------------

// A handler dies mid-restore (here: it is removed after it read a fault it never answered); a
// successor resumes with the dead one's shared tracker and a copy of the uffd. The thread whose
// fault was lost is woken, ballooned pages stay zero, and nothing served before is read again.
TEST(FaultHandlerEventsTest, ASuccessorResumesWithTheSharedTracker) {
  SnapshotFile snapshot(256, [](uint64_t p) { return p % 13 == 7; });
  TestVm vm = MapAnonymousVm({snapshot.size()});
  UniqueFd kept_uffd(dup(vm.uffd.fd()));  // what a keeper holds across the handler's death
  auto tracker = PageTracker::CreateShared(snapshot.pages());
  ASSERT_TRUE(tracker.has_value()) << tracker.error().ToString();
  UniqueFd kept_tracker(dup((*tracker)->shared_fd()));
  auto engine = StartEngine(1);
  FaultHandlerOptions first;
  first.adaptive_windows = false;  // a window per fault, as this test counts
  first.tracker = std::move(*tracker);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), first);
  for (uint64_t p = 0; p < 64; ++p) ASSERT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  ASSERT_EQ(madvise(vm.PageAt(16), 16 * kPageSize4K, MADV_DONTNEED), 0);
  ASSERT_EQ(StatsWhen(*engine, id, [](const FaultStats& s) { return s.events_remove >= 1; })
                .events_remove,
            1u);
  ASSERT_TRUE(engine->RemoveSpace(id).has_value());  // the first handler is gone
  // A fault that the dying handler read and never answered.
  std::string late_error;
  std::atomic<bool> late_done{false};
  std::thread late([&] {
    late_error = snapshot.CheckPage(100, vm.PageAt(100));
    late_done.store(true);
  });
  auto rescue = Userfaultfd::Adopt(UniqueFd(dup(kept_uffd.get())));  // unblocks it on failure
  ASSERT_TRUE(rescue.has_value());
  {
    auto dying = Userfaultfd::Adopt(UniqueFd(dup(kept_uffd.get())));
    ASSERT_TRUE(dying.has_value());
    EventSequencer reader(&*dying);
    std::vector<UffdEvent> changes;
    ASSERT_TRUE(WaitUntil([&] {
      (void)reader.Read(&changes);
      return !reader.empty();
    }));
  }
  auto attached = PageTracker::AttachShared(std::move(kept_tracker), snapshot.pages());
  ASSERT_TRUE(attached.has_value()) << attached.error().ToString();
  auto uffd = Userfaultfd::Adopt(std::move(kept_uffd));
  ASSERT_TRUE(uffd.has_value());
  FaultHandlerOptions successor;
  successor.tracker = std::move(*attached);
  successor.resume = true;
  auto handler = FaultHandler::Create(std::move(*uffd), vm.layout, OpenSource(snapshot), successor);
  ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
  auto resumed = engine->AddSpace(std::move(*handler));
  ASSERT_TRUE(resumed.has_value());
  EXPECT_TRUE(WaitUntil([&] { return late_done.load(); })) << "the lost fault was never woken";
  if (!late_done.load())
    (void)rescue->ZeroPage(
        HostVirtAddr(vm.layout.regions()[0].host_addr.value() + 100 * kPageSize4K), kPageSize4K);
  late.join();
  EXPECT_EQ(late_error, "");
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    if (p >= 16 && p < 32) {
      EXPECT_TRUE(AllZero(vm.PageAt(p), kPageSize4K)) << "ballooned page " << p << " came back";
    } else {
      EXPECT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
    }
  }
  const FaultStats stats = StatsWhen(*engine, *resumed, [&](const FaultStats& s) {
    return s.pages_installed() >= snapshot.pages() - 64;
  });
  uint64_t data_after_64 = 0;
  for (uint64_t p = 64; p < snapshot.pages(); ++p) data_after_64 += snapshot.hole(p) ? 0 : 1;
  EXPECT_EQ(stats.bytes_read, data_after_64 * kPageSize4K);  // nothing served before read again
}

// --- guest faults of a secret-hiding VM --------------------------------------------------------

// Firecracker's secret-hiding restore as the handler sees it: a guest memory file (a shmem memfd
// standing for guest_memfd) that Firecracker maps and registers MISSING|MINOR, and the userfault
// bitmap, every bit set. Guest faults are posted; uffd faults come from the mapping.
class SecretHidingFaultsTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kPages = 512;  // 2 MiB
  static constexpr uint64_t kGpaStart = uint64_t{1} << 32;

  // Serves the VM in an engine of one worker; skips where the kernel lacks shmem MINOR faults.
  void StartServing(FaultHandlerOptions options) {
    MakeHandler(std::move(options));
    if (IsSkipped() || HasFatalFailure()) return;
    engine_ = StartEngine(1);
    auto id = engine_->AddSpace(std::move(handler_));
    ASSERT_TRUE(id.has_value());
    id_ = *id;
  }

  // The VM's handler, in handler_, for a test that drives it by hand.
  void MakeHandler(FaultHandlerOptions options) {
    auto file = MemoryFile::Create({.size_bytes = snapshot_.size()});
    ASSERT_TRUE(file.has_value()) << file.error().ToString();
    file_ = *file;
    auto mapping = file_->Map();
    ASSERT_TRUE(mapping.has_value());
    mapping_ = std::make_unique<MemoryMapping>(std::move(*mapping));
    auto uffd =
        Userfaultfd::Create({.required_features = kUffdFeatureEventRemove | kUffdFeatureMinorShmem |
                                                  kUffdFeatureMissingShmem});
    if (!uffd && uffd.error().code() == ErrorCode::kUnsupported) {
      GTEST_SKIP() << uffd.error().ToString();
    }
    ASSERT_TRUE(uffd.has_value());
    ASSERT_TRUE(uffd->Register(mapping_->host_address(), snapshot_.size(),
                               UffdModes::kMissing | UffdModes::kMinor));
    UniqueFd bitmap_fd(memfd_create("guest_mem", MFD_CLOEXEC));
    ASSERT_EQ(ftruncate(bitmap_fd.get(), kPages / 8), 0);
    const std::vector<uint8_t> ones(kPages / 8, 0xff);
    ASSERT_EQ(pwrite(bitmap_fd.get(), ones.data(), ones.size(), 0),
              static_cast<ssize_t>(ones.size()));
    auto bitmap = UserfaultBitmap::Map(std::move(bitmap_fd), snapshot_.size());
    ASSERT_TRUE(bitmap.has_value()) << bitmap.error().ToString();
    bits_ = std::move(*bitmap);
    auto layout = GuestLayout::Create({GuestRegion{GuestPhysAddr(kGpaStart), snapshot_.size(),
                                                   FileOffset(0), mapping_->host_address()}});
    ASSERT_TRUE(layout.has_value());
    options.mode = InstallMode::kMinorTrap;
    options.memory_file = file_;
    options.userfault_bitmap = bits_;
    auto handler =
        FaultHandler::Create(std::move(*uffd), std::move(*layout), OpenSource(snapshot_), options);
    ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
    handler_ = std::move(*handler);
  }

  // Page `p` of the guest memory file as KVM reads it (not through the registered mapping).
  std::string CheckFilePage(uint64_t p) const {
    std::vector<uint8_t> page(kPageSize4K);
    if (pread(file_->fd(), page.data(), kPageSize4K, static_cast<off_t>(p * kPageSize4K)) !=
        static_cast<ssize_t>(kPageSize4K)) {
      return "short read";
    }
    return snapshot_.CheckPage(p, page.data());
  }

  SnapshotFile snapshot_{kPages, [](uint64_t p) { return p % 10 == 3; }};
  std::shared_ptr<MemoryFile> file_;
  std::unique_ptr<MemoryMapping> mapping_;
  std::shared_ptr<UserfaultBitmap> bits_;
  std::unique_ptr<FaultHandler> handler_;
  std::unique_ptr<FaultEngine> engine_;
  SpaceId id_{};
};

// A working set given once the VM has started (after its message 2, as gmem serve gives a
// secret-hiding VM's): its pages go into the guest memory file with their bits cleared; a vCPU's
// fault posted meanwhile is served first.
TEST_F(SecretHidingFaultsTest, AWorkingSetGivenLateIsPutInTheFileWithItsBitsCleared) {
  MakeHandler({});
  if (IsSkipped() || HasFatalFailure()) return;
  const std::vector<uint64_t> learned = {10, 11, 12, 300, 301};
  ASSERT_TRUE(handler_
                  ->StartPrefetch(
                      std::make_shared<const WorkingSet>(WorkingSet::Merge(WorkingSet(), learned)))
                  .has_value());
  std::vector<uint64_t> served;
  Status posted = handler_->PostGuestFault(
      {.vcpu = 2, .flags = 0x10, .gpa = GuestPhysAddr(kGpaStart + 400 * kPageSize4K)},
      [&](const GuestFault&, const Status& s) {
        EXPECT_TRUE(s.has_value()) << testutil::Describe(s);
        served.push_back(400);
      });
  ASSERT_TRUE(posted.has_value()) << testutil::Describe(posted);
  auto more = handler_->Serve(ServeBudget{});
  ASSERT_TRUE(more.has_value()) << more.error().ToString();
  EXPECT_EQ(served, std::vector<uint64_t>{400}) << "the vCPU's fault in the first turn";
  for (int turn = 0; *more && turn < 100; ++turn) {
    more = handler_->Serve(ServeBudget{});
    ASSERT_TRUE(more.has_value()) << more.error().ToString();
  }
  EXPECT_FALSE(*more);
  EXPECT_EQ(handler_->stats().pages_prefetched, learned.size());
  for (uint64_t p : learned) {
    EXPECT_EQ(CheckFilePage(p), "") << p;
    EXPECT_FALSE(bits_->IsSet(p)) << p;
  }
  EXPECT_TRUE(bits_->IsSet(200)) << "a page neither learned nor faulted keeps its bit";
  EXPECT_EQ(handler_->stats().faults_guest, 1u);
}

TEST_F(SecretHidingFaultsTest, GuestFaultsPutContentInTheFileThenClearTheirBits) {
  StartServing({.adaptive_windows = false});  // a window per fault, as this test counts
  if (IsSkipped() || HasFatalFailure()) return;
  std::mutex mu;
  std::vector<std::pair<GuestFault, Status>> done;
  auto record = [&](const GuestFault& f, const Status& status) {
    std::lock_guard lock(mu);
    done.emplace_back(f, status);
  };
  const uint64_t window = kDefaultFaultAroundBytes / kPageSize4K;
  // vCPU 2 faults on page 100 (its window: 96..111); vCPU 0 outside every region.
  Status posted = engine_->PostGuestFault(
      id_, {.vcpu = 2, .flags = 0x10, .gpa = GuestPhysAddr(kGpaStart + 100 * kPageSize4K + 17)},
      record);
  ASSERT_TRUE(posted.has_value()) << testutil::Describe(posted);
  posted =
      engine_->PostGuestFault(id_, {.vcpu = 0, .flags = 0x30, .gpa = GuestPhysAddr(0)}, record);
  ASSERT_TRUE(posted.has_value()) << testutil::Describe(posted);
  ASSERT_TRUE(WaitUntil([&] {
    std::lock_guard lock(mu);
    return done.size() == 2;
  }));
  std::lock_guard lock(mu);
  EXPECT_EQ(done[0].first.vcpu, 2u);
  EXPECT_EQ(done[0].first.flags, 0x10u);
  EXPECT_TRUE(done[0].second.has_value()) << testutil::Describe(done[0].second);
  EXPECT_EQ(testutil::ErrorCodeOf(done[1].second), ErrorCode::kOutOfRange);
  // The window's content is in the file, and exactly its bits are clear.
  for (uint64_t p = 96; p < 96 + window; ++p) {
    EXPECT_EQ(CheckFilePage(p), "") << p;
    EXPECT_FALSE(bits_->IsSet(p)) << p;
  }
  EXPECT_EQ(bits_->CountSet(0, kPages), kPages - window);
  // Firecracker's own access to a populated page is a minor fault, only mapped; to another page,
  // a missing fault whose window gets its content and its bits cleared too.
  const auto* host = reinterpret_cast<const uint8_t*>(mapping_->data());
  EXPECT_EQ(snapshot_.CheckPage(101, host + 101 * kPageSize4K), "");
  EXPECT_EQ(snapshot_.CheckPage(300, host + 300 * kPageSize4K), "");
  EXPECT_TRUE(WaitUntil([&] { return bits_->CountSet(0, kPages) == kPages - 2 * window; }));
  EXPECT_FALSE(bits_->IsSet(300));
  const FaultStats stats = StatsWhen(*engine_, id_, [&](const FaultStats& s) {
    return s.faults_minor >= 1 && s.pages_installed() >= 2 * window;
  });
  EXPECT_EQ(stats.faults_guest, 2u);
  EXPECT_EQ(stats.pages_populated, window);
  EXPECT_GE(stats.faults_minor, 1u);
}

// --- working sets -------------------------------------------------------------------------------

// What a restore's faults needed is recorded in order; the next restore installs it from the
// start, before any fault, so that touching it faults no more.
TEST(FaultHandlerEventsTest, AWorkingSetLearnedFromOneRestoreIsPrefetchedInTheNext) {
  SnapshotFile snapshot(512, [](uint64_t p) { return p % 7 == 2; });
  const std::vector<uint64_t> touched = {300, 301, 17, 18, 19, 450};
  auto recorder = std::make_shared<WorkingSetRecorder>();
  {
    TestVm vm = MapAnonymousVm({snapshot.size()});
    auto engine = StartEngine(1);
    FaultHandlerOptions options;
    options.adaptive_windows = false;          // one page per fault: what was touched is recorded
    options.fault_around_bytes = kPageSize4K;  // what is recorded is exactly what was touched
    options.recorder = recorder;
    SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
    for (uint64_t p : touched) ASSERT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
    ASSERT_EQ(StatsWhen(*engine, id,
                        [&](const FaultStats& s) { return s.pages_installed() >= touched.size(); })
                  .pages_installed(),
              touched.size());
  }
  const std::vector<uint64_t> recorded = recorder->Take();
  EXPECT_EQ(recorded, touched);
  auto learned = std::make_shared<const WorkingSet>(WorkingSet::Merge(WorkingSet(), recorded));
  // The next restore: prefetched as soon as it is served, without a fault.
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  FaultHandlerOptions options;
  options.prefetch = learned;
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
  const FaultStats prefetched = StatsWhen(
      *engine, id, [&](const FaultStats& s) { return s.pages_prefetched >= touched.size(); });
  EXPECT_EQ(prefetched.pages_prefetched, touched.size());
  EXPECT_EQ(prefetched.faults(), 0u);
  for (uint64_t p : touched) EXPECT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  EXPECT_EQ(engine->Stats(id)->faults(), 0u);              // nothing it needed faulted
  EXPECT_EQ(snapshot.CheckPage(200, vm.PageAt(200)), "");  // the rest on demand, as before
  const FaultStats after =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.faults() >= 1; });
  EXPECT_EQ(after.faults(), 1u);
  // That fault found its page pending: a miss of the prefetch, never a hit.
  EXPECT_EQ(after.prefetch_misses, 1u);
  EXPECT_EQ(after.prefetch_hits, 0u);
  EXPECT_EQ(after.pages_filled, 0u);
}

// Fault-all puts every page into the guest memory file in the background, data and zero pages
// alike, and clears each page's bit once its content is in: after the fill no vCPU would exit for
// any page. A vCPU's fault starts the fill as a uffd fault does.
TEST_F(SecretHidingFaultsTest, FaultAllStartedByAVcpuFaultClearsEveryBitAfterItsContent) {
  StartServing({.fill = FillMode::kAtFirstFault});
  if (IsSkipped() || HasFatalFailure()) return;
  std::atomic<bool> served{false};
  Status posted = engine_->PostGuestFault(
      id_, {.vcpu = 1, .flags = 0x10, .gpa = GuestPhysAddr(kGpaStart + 7 * kPageSize4K)},
      [&](const GuestFault&, const Status& status) {
        EXPECT_TRUE(status.has_value()) << testutil::Describe(status);
        served = true;
      });
  ASSERT_TRUE(posted.has_value()) << testutil::Describe(posted);
  const FaultStats stats =
      StatsWhen(*engine_, id_, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  ASSERT_GT(stats.fill_finished_ns, 0u) << "the fill never finished";
  EXPECT_TRUE(served);
  EXPECT_EQ(stats.faults_guest, 1u);
  EXPECT_EQ(stats.faults_missing + stats.faults_minor, 0u) << "no uffd fault was needed";
  EXPECT_EQ(bits_->CountSet(0, kPages), 0u);
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(CheckFilePage(p), "") << p;
  // The VMM's own accesses after the fill find the pages in the file: minor faults at most.
  const auto* host = reinterpret_cast<const uint8_t*>(mapping_->data());
  for (uint64_t p = 0; p < kPages; p += 37) {
    EXPECT_EQ(snapshot_.CheckPage(p, host + p * kPageSize4K), "") << p;
  }
  EXPECT_EQ(engine_->Stats(id_).value_or(FaultStats{}).faults_missing, 0u);
}

// A background fill of a secret-hiding VM puts every page into the guest memory file, with no
// fault at all, and clears each page's bit once its content is in.
TEST_F(SecretHidingFaultsTest, BackgroundFillPutsEveryPageInTheFileAndClearsItsBit) {
  StartServing({.fill = FillMode::kBackground});
  if (IsSkipped() || HasFatalFailure()) return;
  const FaultStats stats =
      StatsWhen(*engine_, id_, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  ASSERT_GT(stats.fill_finished_ns, 0u) << "the fill never finished";
  EXPECT_EQ(stats.pages_filled, kPages);
  EXPECT_EQ(stats.faults() + stats.faults_guest, 0u);
  EXPECT_EQ(bits_->CountSet(0, kPages), 0u);
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(CheckFilePage(p), "") << p;
}

// --- VMs that misbehave -----------------------------------------------------------------------

// A VM that faults outside the regions it declared (it registered more than it described): the
// access gets SIGBUS instead of a wake that would fault again at once, forever; a VM on the same
// worker is served meanwhile.
TEST(FaultHandlerEventsTest, AFaultOutsideTheRegionsIsPoisonedNotRetriedForever) {
  auto probe = Userfaultfd::Probe();
  SnapshotFile snapshot(64);
  SocketPair sockets;
  ChildVmOptions options;
  options.registered_pages = 128;  // declares 64
  pid_t child = ForkVm(
      sockets.child.get(), 64,
      [](volatile uint8_t* mem, Userfaultfd&) {
        signal(SIGBUS, SIG_DFL);  // a sanitizer's handler would turn the signal into an exit
        (void)mem[100 * kPageSize4K];
        return 1;
      },
      options);
  auto engine = StartEngine(QuickLiveness());
  ClosedWatch watch;
  ASSERT_TRUE(
      engine->AddSpace(ReceiveVm(sockets.parent.get(), OpenSource(snapshot)), watch.Callback())
          .has_value());
  TestVm neighbour = MapAnonymousVm({snapshot.size()});
  SpaceId neighbour_id = Serve(*engine, neighbour, OpenSource(snapshot));
  EXPECT_EQ(VerifyAll(neighbour, snapshot), 0);
  const std::optional<int> status = WaitChild(child);
  ASSERT_TRUE(status.has_value()) << "the stray fault was retried forever";
  EXPECT_TRUE(WIFSIGNALED(*status) && WTERMSIG(*status) == SIGBUS) << *status;
  ASSERT_TRUE(watch.WaitClosed());
  EXPECT_GE(watch.stats().faults_stray, 1u);
  EXPECT_LE(watch.stats().faults_stray, 2u);
  EXPECT_TRUE(engine->RemoveSpace(neighbour_id).has_value());
  (void)probe;
}

// A VM that survives its SIGBUSes and keeps faulting outside its regions is given up after
// max_stray_faults, and its space freed.
TEST(FaultHandlerEventsTest, AVmThatKeepsFaultingOutsideItsRegionsIsGivenUp) {
  SnapshotFile snapshot(64);
  SocketPair sockets;
  ChildVmOptions options;
  options.registered_pages = 128;
  pid_t child = ForkVm(
      sockets.child.get(), 64,
      [](volatile uint8_t* mem, Userfaultfd&) {
        static sigjmp_buf env;
        struct sigaction action = {};
        action.sa_handler = [](int) { siglongjmp(env, 1); };
        sigemptyset(&action.sa_mask);
        sigaction(SIGBUS, &action, nullptr);
        // Each stray page gets SIGBUS, which this VM shrugs off; the handler gives up at the 4th.
        for (uint64_t p = 64; p < 128; ++p) {
          if (sigsetjmp(env, 1) == 0) (void)mem[p * kPageSize4K];
        }
        return 1;  // never reached: the 4th fault is never answered
      },
      options);
  auto engine = StartEngine(QuickLiveness());
  ClosedWatch watch;
  FaultHandlerOptions handler_options;
  handler_options.max_stray_faults = 3;
  ASSERT_TRUE(engine
                  ->AddSpace(ReceiveVm(sockets.parent.get(), OpenSource(snapshot), handler_options),
                             watch.Callback())
                  .has_value());
  ASSERT_TRUE(watch.WaitClosed()) << "the VM was never given up";
  EXPECT_EQ(testutil::ErrorCodeOf(watch.why()), ErrorCode::kProtocolError)
      << testutil::Describe(watch.why());
  EXPECT_NE(testutil::Describe(watch.why()).find("outside its regions"), std::string::npos);
  EXPECT_EQ(watch.stats().faults_stray, 4u);
  EXPECT_EQ(engine->space_count(), 0u);
  kill(child, SIGKILL);
  EXPECT_TRUE(WaitChild(child).has_value());
}

// A fault-all's turn does a bounded amount of work: one Serve() installs its faulting window and
// one budget of fill, then says that work is left; another VM's fault is served meanwhile.
TEST(FaultHandlerEventsTest, AFaultAllTurnIsBoundedByItsBudget) {
  const uint64_t big_pages = (uint64_t{64} << 20) / kPageSize4K;
  SnapshotFile big_snapshot(big_pages, [](uint64_t p) { return p % 512 != 0; });
  SnapshotFile small_snapshot(64);
  TestVm big = MapAnonymousVm({big_snapshot.size()});
  TestVm small = MapAnonymousVm({small_snapshot.size()});
  auto big_queue = Userfaultfd::Adopt(UniqueFd(dup(big.uffd.fd())));
  auto small_queue = Userfaultfd::Adopt(UniqueFd(dup(small.uffd.fd())));
  ASSERT_TRUE(big_queue.has_value() && small_queue.has_value());
  FaultHandlerOptions fault_all;
  fault_all.fill = FillMode::kAtFirstFault;
  auto big_handler = testutil::MakeHandler(big, OpenSource(big_snapshot), fault_all);
  auto small_handler = testutil::MakeHandler(small, OpenSource(small_snapshot));
  auto queued = [](const Userfaultfd& u) {
    return u.Inspect().value_or(UffdFdInfo{}).pending_faults;
  };
  std::thread big_thread([&] { (void)big_snapshot.CheckPage(0, big.PageAt(0)); });
  std::string small_error;
  std::thread small_thread([&] { small_error = small_snapshot.CheckPage(1, small.PageAt(1)); });
  ASSERT_TRUE(WaitUntil([&] { return queued(*big_queue) >= 1 && queued(*small_queue) >= 1; }));
  const ServeBudget budget{.fill_bytes = uint64_t{1} << 20};
  auto more = big_handler->Serve(budget);
  ASSERT_TRUE(more.has_value()) << more.error().ToString();
  EXPECT_TRUE(*more) << "the fill is not done after one turn";
  big_thread.join();  // its fault was served in that turn
  FaultStats stats = big_handler->stats();
  EXPECT_EQ(stats.fill_finished_ns, 0u);
  EXPECT_LE(stats.pages_installed(), (budget.fill_bytes + kDefaultFaultAroundBytes) / kPageSize4K);
  // The other VM's turn, while the fill has most of its work left.
  auto small_more = small_handler->Serve(budget);
  ASSERT_TRUE(small_more.has_value());
  small_thread.join();
  EXPECT_EQ(small_error, "");
  // The fill goes on, a budget a turn, until it is done.
  int turns = 1;
  while (true) {
    more = big_handler->Serve(budget);
    ASSERT_TRUE(more.has_value()) << more.error().ToString();
    ++turns;
    if (!*more) break;
    ASSERT_LT(turns, 1000);
  }
  stats = big_handler->stats();
  EXPECT_GT(stats.fill_finished_ns, 0u);
  EXPECT_EQ(stats.pages_installed(), big_pages);
  EXPECT_GE(turns, static_cast<int>(big_snapshot.size() / budget.fill_bytes));
  EXPECT_EQ(VerifyAll(big, big_snapshot), 0);
}

// The engine gives turns round-robin: while one VM's fault-all fills 1 GiB two pages a turn (some
// 130 thousand turns), a fault of another VM on the same worker is served at once, long before
// the fill is done.
TEST(FaultHandlerEventsTest, FaultAllDoesNotStallAnotherVmOnTheSameWorker) {
  const uint64_t big_pages = (uint64_t{1} << 30) / kPageSize4K;
  // Holes only: the fill installs zero pages, which cost no memory.
  SnapshotFile big_snapshot(big_pages, [](uint64_t) { return true; });
  SnapshotFile small_snapshot(64);
  TestVm big = MapAnonymousVm({big_snapshot.size()});
  TestVm small = MapAnonymousVm({small_snapshot.size()});
  FaultHandlerOptions fault_all;
  fault_all.fill = FillMode::kAtFirstFault;
  FaultEngineOptions options{.workers = 1};
  options.budget.fill_bytes = 2 * kPageSize4K;
  auto engine = StartEngine(options);
  SpaceId big_id = Serve(*engine, big, OpenSource(big_snapshot), fault_all);
  SpaceId small_id = Serve(*engine, small, OpenSource(small_snapshot));
  EXPECT_TRUE(AllZero(big.PageAt(0), kPageSize4K));  // starts the fill
  ASSERT_TRUE(WaitUntil([&] {
    const FaultStats s = engine->Stats(big_id).value_or(FaultStats{});
    return s.pages_installed() > 16;
  }));
  EXPECT_EQ(small_snapshot.CheckPage(1, small.PageAt(1)), "");
  const FaultStats small_stats =
      StatsWhen(*engine, small_id, [](const FaultStats& s) { return s.first_fault_served_ns > 0; });
  const FaultStats big_stats =
      StatsWhen(*engine, big_id, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  ASSERT_GT(big_stats.fill_finished_ns, 0u) << "fault-all never finished";
  ASSERT_GT(small_stats.first_fault_served_ns, 0u);
  EXPECT_LT(small_stats.first_fault_served_ns, big_stats.fill_finished_ns)
      << "the small VM waited for the whole fault-all of the big one";
  EXPECT_EQ(big_stats.pages_installed(), big_pages);
  EXPECT_EQ(big_stats.faults_missing, 1u);
}

// A background fill out of budget waits to be woken: its worker does not spin on it (its turns
// are bounded by the grains of budget the fill needs, whatever the time it takes), and a VM on
// the same worker is served meanwhile, long before the fill is done.
TEST(FaultHandlerEventsTest, ARateLimitedFillNeitherSpinsNorStallsAnotherVm) {
  SnapshotFile big_snapshot(4096, [](uint64_t p) { return p % 64 == 0; });  // 16 MiB
  SnapshotFile small_snapshot(64);
  TestVm big = MapAnonymousVm({big_snapshot.size()});
  TestVm small = MapAnonymousVm({small_snapshot.size()});
  FaultHandlerOptions background;
  background.fill = FillMode::kBackground;
  // 16 MiB at 8 MiB/s: 2 s at the least, however fast the machine.
  background.fill_bytes_per_second = uint64_t{8} << 20;
  auto engine = StartEngine(1);
  SpaceId big_id = Serve(*engine, big, OpenSource(big_snapshot), background);
  SpaceId small_id = Serve(*engine, small, OpenSource(small_snapshot));
  ASSERT_TRUE(
      WaitUntil([&] { return engine->Stats(big_id).value_or(FaultStats{}).pages_filled > 0; }));
  // The small VM's pages, one fault at a time, while the big one fills.
  for (uint64_t p = 0; p < small_snapshot.pages(); p += 2) {
    ASSERT_EQ(small_snapshot.CheckPage(p, small.PageAt(p)), "");
  }
  const FaultStats small_stats = *engine->Stats(small_id);
  EXPECT_GT(small_stats.faults(), 0u);
  EXPECT_EQ(engine->Stats(big_id)->fill_finished_ns, 0u)
      << "the small VM's faults waited for the whole fill of the big one";
  const FaultStats big_stats =
      StatsWhen(*engine, big_id, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  ASSERT_GT(big_stats.fill_finished_ns, 0u) << "the fill never finished";
  EXPECT_EQ(big_stats.pages_filled, big_snapshot.pages());
  EXPECT_EQ(big_stats.faults(), 0u);
  // A turn to start, one per grain of budget (each wake comes once a grain is there), and the
  // turns the burst at the start saves: a worker that polled would take thousands.
  const uint64_t grain_pages = kFillGrainBytes / kPageSize4K;
  EXPECT_LE(big_stats.turns, big_snapshot.pages() / grain_pages + 8)
      << "the worker spun on a fill that was out of budget";
  EXPECT_EQ(VerifyAll(big, big_snapshot), 0);
}

}  // namespace
}  // namespace guestmem
