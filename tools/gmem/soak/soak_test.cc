// Tests of the soak's parts (its content model, the failing source, the injection list, the
// launcher) and of whole runs: a run passes where the fault handler is right, and fails, naming
// the byte, where the content is wrong. Runs are bounded by a count of faults, not by time, and
// every enabled injection must have happened before a run ends.
#include "soak/soak.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/page_source.h"
#include "guestmem/userfaultfd.h"
#include "soak/content.h"
#include "soak/failing_source_os.h"
#include "soak/launcher.h"
#include "testutil/test_vm.h"

namespace guestmem::soak {
namespace {

TEST(SoakContentTest, HolesComeAsWholeWindowsAndSinglePages) {
  constexpr uint64_t kPages = 16384;
  uint64_t holes = 0;
  uint64_t hole_windows = 0;
  uint64_t single_holes = 0;
  for (uint64_t window = 0; window < kPages / kWindowPages; ++window) {
    uint64_t in_window = 0;
    for (uint64_t p = window * kWindowPages; p < (window + 1) * kWindowPages; ++p) {
      in_window += IsHolePage(p) ? 1 : 0;
    }
    holes += in_window;
    if (in_window == kWindowPages) ++hole_windows;
    if (in_window > 0 && in_window < kWindowPages) single_holes += in_window;
  }
  // One window in seven, and one page in 23 of the others: a fault-around window mixes both.
  EXPECT_GT(hole_windows, kPages / kWindowPages / 10);
  EXPECT_LT(hole_windows, kPages / kWindowPages / 5);
  EXPECT_GT(single_holes, kPages / 40);
  EXPECT_LT(holes, kPages / 4);
}

TEST(SoakContentTest, FailingPagesAreDataPagesAtTheAskedRate) {
  constexpr uint64_t kPages = 100000;
  uint64_t failing = 0;
  uint64_t data = 0;
  for (uint64_t p = 0; p < kPages; ++p) {
    if (!IsHolePage(p)) ++data;
    if (IsFailingPage(p, 5)) {
      ++failing;
      EXPECT_FALSE(IsHolePage(p)) << p;
    }
    EXPECT_FALSE(IsFailingPage(p, 0));
  }
  EXPECT_GT(failing, data * 3 / 1000);
  EXPECT_LT(failing, data * 7 / 1000);
}

TEST(SoakContentTest, EveryWordOfEveryPageDiffers) {
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> seen;
  for (uint64_t page = 0; page < 64; ++page) {
    for (uint64_t word = 0; word < kWordsPerPage; ++word) {
      const auto [it, fresh] = seen.emplace(SnapshotWord(page, word), std::pair(page, word));
      EXPECT_TRUE(fresh) << "page " << page << " word " << word << " repeats page "
                         << it->second.first << " word " << it->second.second;
      EXPECT_NE(SnapshotWord(page, word), 0u);
      EXPECT_NE(PatternWord(7, page, kFirstGeneration, word), SnapshotWord(page, word));
      EXPECT_NE(PatternWord(7, page, kFirstGeneration, word),
                PatternWord(7, page, kFirstGeneration + 1, word));
    }
  }
  EXPECT_EQ(DescribeState(kZero, false), "zero (ballooned, not written since)");
  EXPECT_EQ(DescribeState(kSnapshot, true), "zero (a hole in the snapshot)");
  EXPECT_EQ(DescribeState(kFirstGeneration + 2, false), "the VM's own pattern (generation 3)");
}

// A file of `pages` pages, page p filled with the byte p + 1.
std::string WriteFile(const TempDir& dir, uint64_t pages) {
  const std::string path = dir.File("source.mem");
  UniqueFd fd(open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  std::vector<uint8_t> page(kPageSize4K);
  for (uint64_t p = 0; p < pages; ++p) {
    std::fill(page.begin(), page.end(), static_cast<uint8_t>(p + 1));
    EXPECT_EQ(pwrite(fd.get(), page.data(), page.size(), static_cast<off_t>(p * kPageSize4K)),
              static_cast<ssize_t>(page.size()));
  }
  return path;
}

TEST(FailingSourceOsTest, ReadsStopAtTheFirstFailingPageLikeABadSector) {
  constexpr uint32_t kPermille = 50;
  // The first failing page that has a readable page before it.
  uint64_t bad = 1;
  while (!IsFailingPage(bad, kPermille) || IsFailingPage(bad - 1, kPermille)) ++bad;
  TempDir dir;
  const std::string path = WriteFile(dir, bad + 2);
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  FailingSourceOs os(kPermille);
  std::vector<uint8_t> buf(3 * kPageSize4K);
  const off_t before = static_cast<off_t>((bad - 1) * kPageSize4K);
  // Starting before it: the bytes up to it.
  EXPECT_EQ(os.Pread(fd.get(), buf.data(), 2 * kPageSize4K, before),
            static_cast<ssize_t>(kPageSize4K));
  EXPECT_EQ(buf[0], static_cast<uint8_t>(bad));
  // Starting on it, or in it: EIO.
  EXPECT_EQ(os.Pread(fd.get(), buf.data(), kPageSize4K, before + kPageSize4K), -EIO);
  EXPECT_EQ(os.Pread(fd.get(), buf.data(), 8, before + kPageSize4K + 100), -EIO);
  // Not touching it: all of it.
  EXPECT_EQ(os.Pread(fd.get(), buf.data(), kPageSize4K, before), static_cast<ssize_t>(kPageSize4K));
  EXPECT_EQ(os.failed_reads(), 2u);
  EXPECT_EQ(os.short_reads(), 1u);

  // Through a page source: a read that covers the failing page fails whole, as an I/O error.
  auto source = RawFileSource::Open(path, &os);
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  auto span = std::as_writable_bytes(std::span(buf));
  Status covering =
      (*source)->ReadAt(FileOffset(static_cast<uint64_t>(before)), span.first(2 * kPageSize4K));
  ASSERT_FALSE(covering.has_value());
  EXPECT_EQ(covering.error().code(), ErrorCode::kIoError);
  EXPECT_TRUE(
      (*source)->ReadAt(FileOffset(static_cast<uint64_t>(before)), span.first(kPageSize4K)));
  EXPECT_TRUE((*source)->ReadAt(FileOffset((bad + 1) * kPageSize4K), span.first(kPageSize4K)));
}

TEST(SoakInjectionsTest, ListsParseAndPrintBack) {
  EXPECT_EQ(ParseInjections("all").value_or(0), kAllInjections);
  EXPECT_EQ(ParseInjections("none").value_or(1), 0u);
  EXPECT_EQ(ParseInjections("").value_or(1), 0u);
  EXPECT_EQ(ParseInjections("kill,balloon").value_or(0), kInjectKill | kInjectBalloon);
  for (uint32_t mask = 0; mask <= kAllInjections; ++mask) {
    EXPECT_EQ(ParseInjections(InjectionList(mask)).value_or(99), mask) << InjectionList(mask);
  }
  EXPECT_EQ(InjectionList(kAllInjections), "balloon,munmap,fork,kill,ioerror");
  auto bad = ParseInjections("balloon,flood");
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.error().context().find("'flood'"), std::string::npos);
  EXPECT_FALSE(ParseInjections("balloon,").has_value());
}

// Collects launcher events until `done` holds for them, waiting on the launcher's descriptor;
// fails the test after 30 s.
template <typename Done>
std::vector<LauncherEvent> EventsUntil(Launcher& launcher, Done done) {
  std::vector<LauncherEvent> events;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done(events) && std::chrono::steady_clock::now() < deadline) {
    auto next = launcher.Next();
    EXPECT_TRUE(next.has_value());
    if (!next) break;
    if (next->has_value()) {
      events.push_back(**next);
      continue;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd ready{.fd = launcher.fd(), .events = POLLIN, .revents = 0};
    (void)poll(&ready, 1, static_cast<int>(std::max<int64_t>(left.count(), 0)));
  }
  EXPECT_TRUE(done(events)) << "launcher events missing after 30 s";
  return events;
}

size_t CountKind(const std::vector<LauncherEvent>& events, LauncherEvent::Kind kind) {
  return static_cast<size_t>(std::count_if(events.begin(), events.end(),
                                           [&](const LauncherEvent& e) { return e.kind == kind; }));
}

TEST(SoakLauncherTest, ReportsEachVmsPidAndExitStatus) {
  auto launcher = Launcher::Start([](const SpawnRequest& request) {
    // A VM starts with nothing open but the standard descriptors.
    if (fcntl(3, F_GETFD) != -1) return 99;
    return static_cast<int>(request.index + 10);
  });
  ASSERT_TRUE(launcher.has_value()) << launcher.error().ToString();
  for (uint32_t i = 0; i < 3; ++i) ASSERT_TRUE((*launcher)->Spawn({.index = i}));
  auto events = EventsUntil(
      **launcher, [](const auto& e) { return CountKind(e, LauncherEvent::Kind::kExited) == 3; });
  std::map<uint32_t, pid_t> pids;
  for (const LauncherEvent& e : events) {
    if (e.kind == LauncherEvent::Kind::kSpawned) {
      pids[e.index] = e.pid;
      continue;
    }
    ASSERT_EQ(pids.count(e.index), 1u) << "exit before spawn of vm " << e.index;
    EXPECT_EQ(e.pid, pids[e.index]);
    ASSERT_TRUE(WIFEXITED(e.status)) << e.status;
    EXPECT_EQ(WEXITSTATUS(e.status), static_cast<int>(e.index + 10));
  }
  EXPECT_EQ(pids.size(), 3u);
}

TEST(SoakLauncherTest, KillingAVmsGroupKillsItsChildrenToo) {
  TempDir dir;
  const std::string marker = dir.File("grandchild");
  auto launcher = Launcher::Start([&](const SpawnRequest&) {
    if (const pid_t child = fork(); child == 0) {
      // The VM's own child: it says who it is, then waits to be killed with its group.
      const std::string pid = std::to_string(getpid());
      const std::string temporary = marker + ".tmp";
      UniqueFd fd(open(temporary.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
      (void)!write(fd.get(), pid.data(), pid.size());
      fd.reset();
      (void)rename(temporary.c_str(), marker.c_str());
      for (;;) pause();
    }
    pause();
    return 0;
  });
  ASSERT_TRUE(launcher.has_value()) << launcher.error().ToString();
  ASSERT_TRUE((*launcher)->Spawn({.index = 7}));
  auto spawned = EventsUntil(**launcher, [](const auto& e) { return !e.empty(); });
  ASSERT_EQ(spawned[0].kind, LauncherEvent::Kind::kSpawned);
  ASSERT_TRUE(testutil::WaitUntil([&] { return access(marker.c_str(), F_OK) == 0; }))
      << "the VM's child never started";
  pid_t grandchild = 0;
  std::ifstream(marker) >> grandchild;
  ASSERT_GT(grandchild, 0);
  ASSERT_EQ(kill(-spawned[0].pid, SIGKILL), 0);
  auto exited = EventsUntil(**launcher, [](const auto& e) { return !e.empty(); });
  ASSERT_EQ(exited[0].kind, LauncherEvent::Kind::kExited);
  EXPECT_EQ(exited[0].index, 7u);
  ASSERT_TRUE(WIFSIGNALED(exited[0].status));
  EXPECT_EQ(WTERMSIG(exited[0].status), SIGKILL);
  launcher->reset();  // waits for the launcher, which reaps what is left
  const bool gone = testutil::WaitUntil([&] { return kill(grandchild, 0) != 0 && errno == ESRCH; });
  if (!gone) kill(grandchild, SIGKILL);
  EXPECT_TRUE(gone) << "the VM's child outlived the kill of its group";
}

// A short run's options: a small snapshot, few VMs, bounded by faults.
SoakOptions ShortRun(uint32_t inject, uint64_t faults) {
  SoakOptions o;
  o.faults = faults;
  o.vms = 3;
  o.threads = 3;
  o.memory_mib = 8;
  o.operations = 4000;
  o.inject = inject;
  o.hang_seconds = 60;
  return o;
}

TEST(SoakRunTest, PassesWithoutInjections) {
  SoakSummary summary;
  EXPECT_EQ(RunSoak(ShortRun(0, 5000), stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.faults, 5000u);
  EXPECT_GE(summary.vms, 1u);
  EXPECT_GT(summary.bytes_verified, 5000u * kPageSize4K);
  EXPECT_EQ(summary.sigbus + summary.sigsegv + summary.kills + summary.balloons, 0u);
}

TEST(SoakRunTest, ACorruptedSnapshotIsReportedAtItsByte) {
  SoakOptions o = ShortRun(0, 1000000);
  uint64_t page = 100;
  while (IsHolePage(page)) ++page;
  o.corrupt_page = page;
  SoakSummary summary;
  EXPECT_EQ(RunSoak(o, stdout, &summary), kSoakFailed);
  char want[96];
  std::snprintf(want, sizeof(want), "page 0x%llx at memory file offset 0x%llx",
                static_cast<unsigned long long>(page),
                static_cast<unsigned long long>(page * kPageSize4K));
  EXPECT_EQ(summary.failure.rfind("wrong byte: vm ", 0), 0u) << summary.failure;
  EXPECT_NE(summary.failure.find(want), std::string::npos) << summary.failure;
  EXPECT_NE(summary.failure.find("offset 0x64 "), std::string::npos) << summary.failure;
}

TEST(SoakRunTest, KilledVmsAreCleanedUp) {
  SoakSummary summary;
  EXPECT_EQ(RunSoak(ShortRun(kInjectKill, 5000), stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.kills, 1u);
}

TEST(SoakRunTest, PagesTheSourceCannotReadRaiseSigbusExactlyThere) {
  SoakOptions o = ShortRun(kInjectIoError, 5000);
  o.fault_around_kib = 4;  // one page per fault: a failing page's neighbours are read apart
  o.ioerror_permille = 20;
  SoakSummary summary;
  EXPECT_EQ(RunSoak(o, stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.sigbus, 1u);
  EXPECT_GE(summary.pages_poisoned, 1u);
  EXPECT_GE(summary.failed_reads, summary.pages_poisoned);
}

TEST(SoakRunTest, BalloonedPagesReadZeroOnePagePerFault) {
  SoakOptions o = ShortRun(kInjectBalloon, 20000);
  o.fault_around_kib = 4;
  SoakSummary summary;
  EXPECT_EQ(RunSoak(o, stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.balloons, 1u);
  EXPECT_GE(summary.storms, 1u);
}

TEST(SoakRunTest, BalloonedPagesReadZeroWhileNeighboursFaultTheirWindows) {
  // The default 64 KiB fault-around: one thread's fault installs the window another thread is
  // ballooning (issue 9, item 1).
  SoakSummary summary;
  EXPECT_EQ(RunSoak(ShortRun(kInjectBalloon, 20000), stdout, &summary), kSoakPassed)
      << summary.failure;
  EXPECT_GE(summary.balloons, 1u);
}

TEST(SoakRunTest, AnUnreadablePageSparesTheRestOfItsWindow) {
  SoakOptions o = ShortRun(kInjectIoError, 5000);
  o.ioerror_permille = 20;
  SoakSummary summary;
  EXPECT_EQ(RunSoak(o, stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.sigbus, 1u);
}

TEST(SoakRunTest, MunmapWithFaultsPendingLeavesTheRestOfTheVmServed) {
  SoakSummary summary;
  EXPECT_EQ(RunSoak(ShortRun(kInjectMunmap, 5000), stdout, &summary), kSoakPassed)
      << summary.failure;
  EXPECT_GE(summary.munmaps, 1u);
}

TEST(SoakRunTest, ForkedChildrenCheckTheirCopyAndAreFreed) {
  auto with_fork = Userfaultfd::Create({.required_features = kUffdFeatureEventFork});
  if (!with_fork) GTEST_SKIP() << "no UFFD_FEATURE_EVENT_FORK: " << with_fork.error().ToString();
  with_fork = Error(ErrorCode::kInternal, "closed");  // no uffd open across the run's fork
  SoakSummary summary;
  EXPECT_EQ(RunSoak(ShortRun(kInjectFork, 5000), stdout, &summary), kSoakPassed) << summary.failure;
  EXPECT_GE(summary.forks, 1u);
  EXPECT_EQ(summary.forked_spaces, summary.forks);  // each child's space ended
}

TEST(SoakRunTest, BadOptionsAreRefused) {
  SoakOptions o = ShortRun(0, 10);
  o.memory_mib = 12;
  EXPECT_EQ(RunSoak(o, stdout), kSoakCannotRun);
  o = ShortRun(0, 10);
  o.fault_around_kib = 48;
  EXPECT_EQ(RunSoak(o, stdout), kSoakCannotRun);
}

}  // namespace
}  // namespace guestmem::soak
