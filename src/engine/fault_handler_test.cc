// Integrity tests of the fault handler and engine with real userfaultfds: every byte a VM reads
// must equal the snapshot (or zero for holes and removed ranges), whatever the threads do.
#include "guestmem/fault_handler.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "base/fault_injection_os.h"
#include "guestmem/fault_engine.h"
#include "guestmem/handshake.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/unique_fd.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/working_set.h"
#include "testutil/error_code.h"
#include "testutil/huge_pages.h"
#include "testutil/snapshot_file.h"
#include "testutil/test_vm.h"

namespace guestmem {
namespace {

using testutil::AllZero;
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

TEST(FaultHandlerTest, CopyServesEveryByteToManyThreads) {
  SnapshotFile snapshot(2048, [](uint64_t p) { return p % 7 == 3; });
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine();
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));

  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 600; ++i) {
        const uint64_t page = rng() % snapshot.pages();
        // Several threads hit the same pages: reads race with each other and with the writes
        // below, which only touch the last byte.
        std::string err = snapshot.CheckPage(page, vm.PageAt(page));
        if (!err.empty() && !(err.find("byte 4095") != std::string::npos)) {
          if (mismatches++ < 3) ADD_FAILURE() << err;
        }
        if (i % 5 == 0)
          vm.PageAt(page)[kPageSize4K - 1] = testutil::SnapshotByte(page, kPageSize4K - 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
  // Holes' last bytes were overwritten with snapshot bytes by the writers: restore zeros first.
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    if (snapshot.hole(p)) vm.PageAt(p)[kPageSize4K - 1] = 0;
  }
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);

  auto stats = engine->RemoveSpace(id);
  ASSERT_TRUE(stats.has_value());
  EXPECT_GT(stats->faults_missing, 0u);
  EXPECT_EQ(stats->pages_installed(), snapshot.pages());  // each page exactly once
  EXPECT_GT(stats->pages_zeroed, 0u);
  EXPECT_EQ(stats->bytes_read, stats->pages_copied * kPageSize4K);
  EXPECT_GT(stats->latency_max_ns, 0u);
  EXPECT_FALSE(engine->RemoveSpace(id).has_value());
}

// A source whose content is slow to come (as a chunk being decoded, an object being fetched):
// nothing is ready until the test opens the gate, and then those waiting are told.
class GatedSource final : public PageSource {
 public:
  explicit GatedSource(std::shared_ptr<const PageSource> inner) : inner_(std::move(inner)) {}
  uint64_t size() const override { return inner_->size(); }
  Status ReadAt(FileOffset offset, std::span<std::byte> out) const override {
    return inner_->ReadAt(offset, out);
  }
  Result<Extent> ExtentAt(FileOffset offset) const override { return inner_->ExtentAt(offset); }
  bool ContentReady(FileOffset, uint64_t, const std::function<void()>& ready) const override {
    std::lock_guard lock(mu_);
    if (open_) return true;
    waiting_.push_back(ready);
    return false;
  }
  std::string Describe() const override { return "gated " + inner_->Describe(); }
  void Open() {
    std::vector<std::function<void()>> waiting;
    {
      std::lock_guard lock(mu_);
      open_ = true;
      waiting.swap(waiting_);
    }
    for (auto& ready : waiting) ready();
  }
  size_t asked() const {
    std::lock_guard lock(mu_);
    return waiting_.size();
  }

 private:
  std::shared_ptr<const PageSource> inner_;
  mutable std::mutex mu_;
  mutable bool open_ = false;
  mutable std::vector<std::function<void()>> waiting_;
};

TEST(FaultHandlerTest, AVmWaitingForContentLeavesItsWorkerToTheOthers) {
  SnapshotFile snapshot(256);
  TestVm slow = MapAnonymousVm({snapshot.size()});
  TestVm quick = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);  // one worker for both VMs
  auto gated = std::make_shared<GatedSource>(OpenSource(snapshot));
  const SpaceId slow_id = Serve(*engine, slow, gated);
  const SpaceId quick_id = Serve(*engine, quick, OpenSource(snapshot));

  std::atomic<bool> slow_done{false};
  std::thread slow_guest([&] {
    const std::string err = snapshot.CheckPage(10, slow.PageAt(10));
    EXPECT_TRUE(err.empty()) << err;
    slow_done = true;
  });
  ASSERT_TRUE(WaitUntil([&] { return gated->asked() > 0; }));
  // The slow VM's fault waits; the same worker serves the other VM meanwhile, every byte.
  EXPECT_EQ(VerifyAll(quick, snapshot), 0);
  EXPECT_FALSE(slow_done.load());
  gated->Open();
  slow_guest.join();
  EXPECT_TRUE(slow_done.load());
  auto stats = engine->RemoveSpace(slow_id);
  ASSERT_TRUE(stats.has_value());
  EXPECT_GE(stats->content_waits, 1u);
  EXPECT_TRUE(engine->RemoveSpace(quick_id).has_value());
}

TEST(FaultHandlerTest, FaultAroundNeverCrossesARegionEdge) {
  // Region 0: 5 pages (window of 16 clipped); region 1: 20 pages.
  SnapshotFile snapshot(25);
  TestVm vm = MapAnonymousVm({5 * kPageSize4K, 20 * kPageSize4K});
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), FixedWindows());
  // Waits for at least `n` pages copied; the test then checks it is not more.
  auto copied = [&](uint64_t n) {
    return StatsWhen(*engine, id, [n](const FaultStats& s) { return s.pages_copied >= n; })
        .pages_copied;
  };

  EXPECT_EQ(snapshot.CheckPage(4, vm.PageAt(4)), "");  // last page of region 0
  EXPECT_EQ(copied(5), 5u);
  EXPECT_EQ(snapshot.CheckPage(5, vm.PageAt(5)), "");  // first page of region 1
  EXPECT_EQ(copied(5 + 16), 5u + 16u);
  EXPECT_EQ(snapshot.CheckPage(24, vm.PageAt(24)), "");  // last page of region 1
  EXPECT_EQ(copied(25), 25u);
  EXPECT_EQ(engine->Stats(id)->faults_missing, 3u);
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  EXPECT_EQ(engine->Stats(id)->faults_missing, 3u);  // nothing faulted twice
}

TEST(FaultHandlerTest, OnePagePerFaultWithoutFaultAround) {
  SnapshotFile snapshot(64);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  FaultHandlerOptions options;
  options.fault_around_bytes = kPageSize4K;
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
  for (uint64_t p = 0; p < 64; p += 2) EXPECT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.pages_copied >= 32; });
  EXPECT_EQ(stats.faults_missing, 32u);
  EXPECT_EQ(stats.pages_copied, 32u);
  // Each fault's service in its three parts, once each: queued, fetching, installing.
  for (const LatencyBuckets* part :
       {&stats.queue_latency, &stats.fetch_latency, &stats.install_latency}) {
    EXPECT_EQ(part->count, 32u);
    EXPECT_GT(part->sum_ns, 0u);
  }
  EXPECT_EQ(stats.prefetch_hits + stats.prefetch_misses, 0u) << "no working set, no prefetch";
}

TEST(FaultHandlerTest, HolesAreZeroPagesWithoutReading) {
  SnapshotFile snapshot(256, [](uint64_t p) { return p < 128; });
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), FixedWindows());
  for (uint64_t p = 0; p < 128; ++p) ASSERT_TRUE(AllZero(vm.PageAt(p), kPageSize4K));
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.pages_zeroed >= 128; });
  EXPECT_EQ(stats.pages_zeroed, 128u);
  EXPECT_EQ(stats.pages_copied, 0u);
  EXPECT_EQ(stats.bytes_read, 0u);
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  EXPECT_EQ(StatsWhen(*engine, id, [](const FaultStats& s) { return s.pages_copied >= 128; })
                .pages_copied,
            128u);
}

// How the page at `address` is mapped, from /proc/self/pagemap: present, and whether it is a page
// of its own (mapped only here). The kernel's shared zero page is present but never exclusive.
struct PageMapping {
  bool present = false;
  bool exclusive = false;
};
PageMapping MappingOf(const void* address) {
  UniqueFd fd(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  uint64_t entry = 0;
  const auto index = reinterpret_cast<uint64_t>(address) / kPageSize4K;
  if (!fd || pread(fd.get(), &entry, sizeof(entry), static_cast<off_t>(index * sizeof(entry))) !=
                 static_cast<ssize_t>(sizeof(entry))) {
    ADD_FAILURE() << "cannot read /proc/self/pagemap";
  }
  return {.present = ((entry >> 63) & 1) != 0, .exclusive = ((entry >> 56) & 1) != 0};
}

TEST(FaultHandlerTest, AWriteFaultsWindowOfZerosIsWritableWithoutASecondFault) {
  SnapshotFile snapshot(64, [](uint64_t) { return true; });  // all holes
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), FixedWindows());
  const uint64_t window = kDefaultFaultAroundBytes / kPageSize4K;

  // A write fault: its whole window gets pages of their own, so writing them takes no
  // copy-on-write fault.
  vm.PageAt(0)[0] = 1;
  for (uint64_t p = 1; p < window; ++p) {
    const PageMapping m = MappingOf(vm.PageAt(p));
    EXPECT_TRUE(m.present && m.exclusive) << "page " << p;
  }
  // A read fault: its window gets the shared zero page, which costs no memory until written.
  ASSERT_TRUE(AllZero(vm.PageAt(window), kPageSize4K));
  for (uint64_t p = window; p < 2 * window; ++p) {
    const PageMapping m = MappingOf(vm.PageAt(p));
    EXPECT_TRUE(m.present && !m.exclusive) << "page " << p;
  }

  for (uint64_t p = 1; p < 2 * window; ++p) vm.PageAt(p)[0] = 1;
  for (uint64_t p = 0; p < 2 * window; ++p) {
    EXPECT_EQ(vm.PageAt(p)[0], 1) << p;
    EXPECT_TRUE(AllZero(vm.PageAt(p) + 1, kPageSize4K - 1)) << p;
  }
  const FaultStats stats = engine->RemoveSpace(id).value_or(FaultStats{});
  EXPECT_EQ(stats.faults(), 2u);  // the writes to zero pages were copy-on-write, not uffd faults
  EXPECT_EQ(stats.pages_zeroed, 2 * window);
  EXPECT_EQ(stats.bytes_read, 0u);
}

TEST(FaultHandlerTest, FaultAllInstallsEverythingOnTheFirstFault) {
  SnapshotFile snapshot(3000, [](uint64_t p) { return p % 10 == 0; });
  TestVm vm = MapAnonymousVm({1000 * kPageSize4K, 2000 * kPageSize4K});
  auto engine = StartEngine(1);
  FaultHandlerOptions options;
  options.fill = FillMode::kAtFirstFault;
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
  EXPECT_EQ(snapshot.CheckPage(1500, vm.PageAt(1500)), "");
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.fault_all_us > 0; });
  EXPECT_GT(stats.fault_all_us, 0u);
  EXPECT_EQ(stats.pages_installed(), snapshot.pages());
  EXPECT_EQ(stats.pages_zeroed, 300u);
  // The first fault brought its window; the fill brought the rest.
  EXPECT_LT(stats.pages_filled, snapshot.pages());
  EXPECT_GE(stats.pages_filled, snapshot.pages() - 16);  // a fault's window is 64 KiB at most
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  EXPECT_EQ(engine->Stats(id)->faults_missing, 1u);  // everything was already there
}

// Serves `handler` by hand, as its worker would, until its fill is done: a turn whenever work is
// left, else at the time it asked to be woken (never earlier: a turn before it would be a spin).
// Returns the turns taken, or -1 if the handler failed or stopped asking with its fill unfinished.
int ServeUntilFilled(FaultHandler& handler) {
  int turns = 0;
  while (handler.stats().fill_finished_ns == 0) {
    auto more = handler.Serve();
    ++turns;
    if (!more) {
      ADD_FAILURE() << more.error().ToString();
      return -1;
    }
    if (*more) continue;
    const auto wake_at = handler.wake_at();
    if (!wake_at) return handler.stats().fill_finished_ns > 0 ? turns : -1;
    std::this_thread::sleep_until(*wake_at);  // the time it named, not a guess
  }
  return turns;
}

// A background fill installs every page not yet served, byte for byte the snapshot's, at its
// rate: a burst first, then a turn whenever a grain of its budget is back, asking to be woken in
// between. A fault arriving while it is out of budget is served at once, and the fill does not
// install that page again.
TEST(FaultHandlerTest, BackgroundFillInstallsEveryPageWhileFaultsAreServed) {
  SnapshotFile snapshot(2048, [](uint64_t p) { return p % 10 == 0; });  // 8 MiB, some holes
  TestVm vm = MapAnonymousVm({768 * kPageSize4K, 1280 * kPageSize4K});
  auto queue = Userfaultfd::Adopt(UniqueFd(dup(vm.uffd.fd())));
  ASSERT_TRUE(queue.has_value());
  FaultHandlerOptions options;
  options.fill = FillMode::kBackground;
  options.fill_bytes_per_second = uint64_t{32} << 20;  // a burst of 2 MiB, then 64 KiB in 2 ms
  auto handler = testutil::MakeHandler(vm, OpenSource(snapshot), options);
  ASSERT_NE(handler, nullptr);
  // The first turn: the fill starts (there is no working set) with its burst, then waits.
  auto more = handler->Serve(ServeBudget{.fill_bytes = uint64_t{4} << 20});
  ASSERT_TRUE(more.has_value()) << more.error().ToString();
  ASSERT_FALSE(*more);
  ASSERT_TRUE(handler->wake_at().has_value()) << "out of budget, it must say when to come back";
  const FaultStats first = handler->stats();
  EXPECT_GE(first.pages_filled, kHugePageSize2M / kPageSize4K);
  EXPECT_LT(first.pages_filled, snapshot.pages() / 2);
  EXPECT_EQ(first.fill_finished_ns, 0u);
  // A fault near the end, which the fill has not reached: served in the next turn, budget or not.
  const uint64_t last = snapshot.pages() - 1;
  std::string fault_error = "not read";
  std::thread reader([&] { fault_error = snapshot.CheckPage(last, vm.PageAt(last)); });
  ASSERT_TRUE(
      WaitUntil([&] { return queue->Inspect().value_or(UffdFdInfo{}).pending_faults > 0; }));
  more = handler->Serve();
  ASSERT_TRUE(more.has_value()) << more.error().ToString();
  reader.join();
  EXPECT_EQ(fault_error, "");
  EXPECT_EQ(handler->stats().faults(), 1u);
  // The rest at its rate: a turn per grain of budget at most, however fast this machine is.
  const int turns = ServeUntilFilled(*handler);
  ASSERT_GT(turns, 0) << "the fill stopped before every page was in";
  const uint64_t grain_pages = kFillGrainBytes / kPageSize4K;
  EXPECT_LE(static_cast<uint64_t>(turns), snapshot.pages() / grain_pages + 8);
  const FaultStats stats = handler->stats();
  EXPECT_EQ(stats.pages_installed(), snapshot.pages()) << "a page installed twice, or missed";
  EXPECT_EQ(stats.pages_filled, snapshot.pages() - 1) << "the faulted page was not the fill's";
  EXPECT_EQ(stats.pages_zeroed, snapshot.pages() / 10 + 1);
  EXPECT_EQ(stats.fault_all_us, 0u) << "a background fill is not fault-all";
  // Every page is there, the snapshot's byte for byte, with no fault to bring it.
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    ASSERT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "") << "page " << p;
  }
  more = handler->Serve();
  ASSERT_TRUE(more.has_value());
  EXPECT_FALSE(*more);
  EXPECT_FALSE(handler->wake_at().has_value()) << "nothing is left to wake for";
  EXPECT_EQ(handler->stats().faults(), 1u);
}

// The fill follows the working set: while the prefetch has pages left, nothing is filled; then
// the fill installs everything else, and nothing twice.
TEST(FaultHandlerTest, BackgroundFillStartsOnceTheWorkingSetIsIn) {
  SnapshotFile snapshot(512);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  std::vector<uint64_t> needed;
  for (uint64_t p = 500; p > 480; --p) needed.push_back(p);  // 20 pages, from the end
  FaultHandlerOptions options;
  options.fill = FillMode::kBackground;
  options.fill_bytes_per_second = UINT64_MAX / 2;  // the order is what is tested, not the rate
  options.prefetch = std::make_shared<const WorkingSet>(WorkingSet::Merge(WorkingSet(), needed));
  auto handler = testutil::MakeHandler(vm, OpenSource(snapshot), options);
  ASSERT_NE(handler, nullptr);
  const ServeBudget eight_pages{.fill_bytes = 8 * kPageSize4K};
  for (int turn = 0; turn < 2; ++turn) {
    auto more = handler->Serve(eight_pages);
    ASSERT_TRUE(more.has_value()) << more.error().ToString();
    EXPECT_TRUE(*more);
    EXPECT_EQ(handler->stats().pages_prefetched, 8u * (turn + 1));
    EXPECT_EQ(handler->stats().pages_filled, 0u) << "filled before the working set was in";
  }
  ASSERT_GT(ServeUntilFilled(*handler), 0);
  const FaultStats stats = handler->stats();
  EXPECT_EQ(stats.pages_prefetched, needed.size());
  EXPECT_EQ(stats.pages_filled, snapshot.pages() - needed.size());
  EXPECT_EQ(stats.pages_installed(), snapshot.pages());
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  EXPECT_EQ(stats.faults(), 0u);
}

// A background fill that its owner starts later (a secret-hiding VM, after its message 2):
// nothing is filled before.
TEST(FaultHandlerTest, ABackgroundFillStartedLaterWaitsUntilAsked) {
  SnapshotFile snapshot(256);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto handler = testutil::MakeHandler(vm, OpenSource(snapshot));
  ASSERT_NE(handler, nullptr);
  auto more = handler->Serve();
  ASSERT_TRUE(more.has_value());
  EXPECT_FALSE(*more);
  EXPECT_FALSE(handler->wake_at().has_value());
  EXPECT_EQ(handler->stats().pages_installed(), 0u);
  ASSERT_TRUE(handler->StartBackgroundFill().has_value());
  ASSERT_GT(ServeUntilFilled(*handler), 0);
  EXPECT_EQ(handler->stats().pages_filled, snapshot.pages());
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
}

TEST(FaultHandlerTest, AFillRateOfZeroIsRefused) {
  SnapshotFile snapshot(16);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  FaultHandlerOptions options;
  options.fill = FillMode::kBackground;
  options.fill_bytes_per_second = 0;
  auto handler = FaultHandler::Create(std::move(vm.uffd), vm.layout, OpenSource(snapshot), options);
  ASSERT_FALSE(handler.has_value());
  EXPECT_EQ(handler.error().code(), ErrorCode::kInvalidArgument);
}

TEST(FaultHandlerTest, MinorTrapWritesTheFileThenContinues) {
  SnapshotFile snapshot(512, [](uint64_t p) { return p % 9 == 0; });
  auto file = MemoryFile::Create({.size_bytes = snapshot.size()});
  ASSERT_TRUE(file.has_value()) << file.error().ToString();
  // Some content is already in the file: those pages must only be continued, not read again.
  std::vector<uint8_t> page(kPageSize4K);
  for (uint64_t p = 100; p < 132; ++p) {
    testutil::FillSnapshotPage(p, page.data());
    if (snapshot.hole(p)) std::fill(page.begin(), page.end(), 0);
    ASSERT_TRUE((*file)->Populate(FileOffset(p * kPageSize4K), std::as_bytes(std::span(page))));
  }
  auto mapping = (*file)->Map();
  ASSERT_TRUE(mapping.has_value()) << mapping.error().ToString();
  auto uffd =
      Userfaultfd::Create({.required_features = kUffdFeatureMinorShmem | kUffdFeatureMissingShmem});
  if (!uffd && uffd.error().code() == ErrorCode::kUnsupported)
    GTEST_SKIP() << uffd.error().ToString();
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  ASSERT_TRUE(uffd->Register(mapping->host_address(), snapshot.size(),
                             UffdModes::kMissing | UffdModes::kMinor));
  auto layout = GuestLayout::Create({GuestRegion{GuestPhysAddr(0), snapshot.size(), FileOffset(0),
                                                 mapping->host_address(), kPageSize4K}});
  ASSERT_TRUE(layout.has_value());
  FaultHandlerOptions options;
  options.mode = InstallMode::kMinorTrap;
  options.memory_file = *file;
  auto handler =
      FaultHandler::Create(std::move(*uffd), std::move(*layout), OpenSource(snapshot), options);
  ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
  auto engine = StartEngine(1);
  auto id = engine->AddSpace(std::move(*handler));
  ASSERT_TRUE(id.has_value());

  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t p = static_cast<uint64_t>(t); p < snapshot.pages(); p += 2) {
        auto* data = reinterpret_cast<const uint8_t*>(mapping->data()) + p * kPageSize4K;
        if (!snapshot.CheckPage(p, data).empty()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  // The file's page states are true: every page now holds its content.
  EXPECT_EQ((*file)->pages().CountPrepared(0, snapshot.pages()), snapshot.pages());
  auto stats = engine->RemoveSpace(*id);
  ASSERT_TRUE(stats.has_value());
  uint64_t data_pages_outside_prepopulated = 0;
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    if (!snapshot.hole(p) && (p < 100 || p >= 132)) ++data_pages_outside_prepopulated;
  }
  EXPECT_EQ(stats->bytes_read, data_pages_outside_prepopulated * kPageSize4K);
  EXPECT_GT(stats->pages_zeroed, 0u);
  EXPECT_EQ(stats->pages_poisoned, 0u);
  // Reading through a second mapping of the file sees the same bytes: content is in the file.
  for (uint64_t p = 0; p < snapshot.pages(); p += 37) {
    std::vector<uint8_t> buf(kPageSize4K);
    ASSERT_EQ(pread((*file)->fd(), buf.data(), kPageSize4K, static_cast<off_t>(p * kPageSize4K)),
              static_cast<ssize_t>(kPageSize4K));
    EXPECT_EQ(snapshot.CheckPage(p, buf.data()), "");
  }
}

TEST(FaultHandlerTest, RemoveRacingWithFaultsReadsZeroAfterwards) {
  SnapshotFile snapshot(4096);
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(2);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));
  const uint64_t half = snapshot.pages() / 2;

  std::atomic<bool> done{false};
  std::atomic<int> bad{0};
  // Readers fault the second half (never removed) over and over.
  std::thread reader([&] {
    std::mt19937_64 rng(7);
    while (!done.load()) {
      const uint64_t p = half + rng() % half;
      if (!snapshot.CheckPage(p, vm.PageAt(p)).empty()) ++bad;
    }
  });
  // The balloon removes 16-page ranges of the first half, some faulted before, some not, and
  // then reads them: zeros, always.
  std::mt19937_64 rng(11);
  for (int round = 0; round < 200; ++round) {
    const uint64_t first = (rng() % (half / 16)) * 16;
    if (round % 2 == 0) (void)snapshot.CheckPage(first, vm.PageAt(first));  // fault it in first
    ASSERT_EQ(madvise(vm.PageAt(first), 16 * kPageSize4K, MADV_DONTNEED), 0);
    for (uint64_t p = first; p < first + 16; ++p) {
      ASSERT_TRUE(AllZero(vm.PageAt(p), kPageSize4K)) << "page " << p << " round " << round;
    }
  }
  done.store(true);
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.events_remove >= 200; });
  EXPECT_GE(stats.events_remove, 200u);
  EXPECT_GT(stats.pages_zeroed, 0u);
}

// --- a VM in another process, as in production ------------------------------------------------

TEST(FaultHandlerTest, SourceErrorPoisonsThePageInsteadOfHanging) {
  SnapshotFile snapshot(64);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  pid_t child = ForkVm(sv[1], 64, [](volatile uint8_t* mem, Userfaultfd&) {
    signal(SIGBUS, SIG_DFL);     // a sanitizer's handler would turn the signal into an exit
    (void)mem[3 * kPageSize4K];  // the source fails here: SIGBUS, not a hang, not zeros
    return 1;
  });
  close(sv[1]);
  FaultInjectionOs broken;
  broken.FailAlways(FaultInjectionOs::Call::kPread, EIO);
  auto handler = ReceiveVm(sv[0], OpenSource(snapshot, &broken));
  ClosedWatch watch;  // declared before the engine: its callback may run until the engine is gone
  auto engine = StartEngine(QuickLiveness());
  auto id = engine->AddSpace(std::move(handler), watch.Callback());
  ASSERT_TRUE(id.has_value());
  const std::optional<int> status = WaitChild(child);
  ASSERT_TRUE(status.has_value()) << "the VM hung on a page its source could not supply";
  // The space ends by itself: the VM's process is gone (SIGBUS), or it was given up.
  ASSERT_TRUE(watch.WaitClosed());
  auto probe = Userfaultfd::Probe();
  if (probe && (probe->features & kUffdFeaturePoison)) {
    ASSERT_TRUE(WIFSIGNALED(*status)) << "child exit status " << *status;
    EXPECT_EQ(WTERMSIG(*status), SIGBUS);
    EXPECT_EQ(testutil::ErrorCodeOf(watch.why()), ErrorCode::kPeerGone)
        << testutil::Describe(watch.why());
    EXPECT_EQ(watch.stats().pages_poisoned, 1u);
    EXPECT_EQ(watch.stats().pages_installed(), 0u);  // never zeros where data was expected
  } else {
    // Without UFFDIO_POISON the space is given up with the source's error.
    EXPECT_EQ(testutil::ErrorCodeOf(watch.why()), ErrorCode::kIoError);
  }
  EXPECT_EQ(engine->space_count(), 0u);
  close(sv[0]);
}

TEST(FaultHandlerTest, VmKilledMidRestoreIsTornDown) {
  SnapshotFile snapshot(8192);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  pid_t child = ForkVm(sv[1], 8192, [](volatile uint8_t* mem, Userfaultfd&) {
    for (;;) {
      for (uint64_t p = 0; p < 8192; p += 17) (void)mem[p * kPageSize4K];
    }
    return 0;
  });
  close(sv[1]);
  ClosedWatch watch;
  auto engine = StartEngine(QuickLiveness());
  FaultHandlerOptions options;
  options.fault_around_bytes = kPageSize4K;  // one fault per page: the VM is busy for long
  auto id = engine->AddSpace(ReceiveVm(sv[0], OpenSource(snapshot), options), watch.Callback());
  ASSERT_TRUE(id.has_value());
  ASSERT_TRUE(WaitUntil([&] { return engine->Stats(*id).value_or(FaultStats{}).faults() >= 20; }))
      << "the VM never faulted";
  ASSERT_EQ(kill(child, SIGKILL), 0);
  const std::optional<int> status = WaitChild(child);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL) << *status;
  // Nobody removes the space: the engine notices by itself that the VM is gone and frees it.
  ASSERT_TRUE(watch.WaitClosed()) << "the space of a killed VM was never freed";
  EXPECT_EQ(testutil::ErrorCodeOf(watch.why()), ErrorCode::kPeerGone)
      << testutil::Describe(watch.why());
  EXPECT_GE(watch.stats().faults(), 20u);
  EXPECT_EQ(engine->space_count(), 0u);
  EXPECT_FALSE(engine->RemoveSpace(*id).has_value());
  close(sv[0]);
}

TEST(FaultHandlerTest, ManyVmsServedAtOnce) {
  SnapshotFile snapshot(1024, [](uint64_t p) { return p % 5 == 1; });
  auto source = OpenSource(snapshot);
  auto engine = StartEngine(2);
  std::vector<TestVm> vms;
  std::vector<SpaceId> ids;
  for (int i = 0; i < 6; ++i) {
    vms.push_back(MapAnonymousVm({snapshot.size()}));
    ids.push_back(Serve(*engine, vms.back(), source));
  }
  EXPECT_EQ(engine->space_count(), 6u);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (auto& vm : vms) {
    threads.emplace_back([&] {
      for (uint64_t p = 0; p < snapshot.pages(); ++p) {
        if (!snapshot.CheckPage(p, vm.PageAt(p)).empty()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  for (SpaceId id : ids) {
    auto stats = engine->RemoveSpace(id);
    ASSERT_TRUE(stats.has_value());
    EXPECT_EQ(stats->pages_installed(), snapshot.pages());
  }
  EXPECT_EQ(engine->space_count(), 0u);
}

// --- huge pages ---------------------------------------------------------------------------

using testutil::HugePageReservation;

TEST(FaultHandlerTest, HugePagesAreServedWhole) {
  HugePageReservation reservation(8);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  // 4 huge pages: data, hole (zero), data, data.
  const uint64_t per_huge = kHugePageSize2M / kPageSize4K;
  SnapshotFile snapshot(4 * per_huge, [&](uint64_t p) { return p / per_huge == 1; });
  TestVm vm = MapAnonymousVm({2 * kHugePageSize2M, 2 * kHugePageSize2M}, kHugePageSize2M);
  auto engine = StartEngine(1);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot));
  std::thread other(
      [&] { (void)snapshot.CheckPage(3 * per_huge + 5, vm.PageAt(3 * per_huge + 5)); });
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  other.join();
  const FaultStats stats = StatsWhen(
      *engine, id, [&](const FaultStats& s) { return s.pages_installed() >= 4 * per_huge; });
  EXPECT_EQ(stats.pages_copied, 3 * per_huge);
  EXPECT_EQ(stats.pages_zeroed, per_huge);
  EXPECT_LE(stats.faults_missing, 5u);
}

// A zero run over two huge pages in fault-all: both are installed, by the fill, with nothing
// copied past the zero source (one fault in all).
TEST(FaultHandlerTest, FaultAllInstallsZeroRunsOfSeveralHugePages) {
  HugePageReservation reservation(4);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  const uint64_t per_huge = kHugePageSize2M / kPageSize4K;
  // Huge pages: zero, zero, data, data: the fill's first chunk is a zero run of two huge pages.
  SnapshotFile snapshot(4 * per_huge, [&](uint64_t p) { return p / per_huge < 2; });
  TestVm vm = MapAnonymousVm({4 * kHugePageSize2M}, kHugePageSize2M);
  auto engine = StartEngine(1);
  FaultHandlerOptions options;
  options.fill = FillMode::kAtFirstFault;
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
  EXPECT_EQ(snapshot.CheckPage(3 * per_huge, vm.PageAt(3 * per_huge)), "");
  const FaultStats stats =
      StatsWhen(*engine, id, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  EXPECT_EQ(stats.pages_zeroed, 2 * per_huge);
  EXPECT_EQ(stats.pages_copied, 2 * per_huge);
  EXPECT_EQ(VerifyAll(vm, snapshot), 0);
  EXPECT_EQ(engine->Stats(id)->faults_missing, 1u);  // everything was there after the first
}

// The full minor trap over a hugetlbfs guest memory file, on demand and with fault-all: zero runs
// longer than one huge page are written whole (never from past the zero source), and the file
// holds exactly the snapshot afterwards.
class MinorTrapHugetlbTest : public ::testing::TestWithParam<bool> {};

TEST_P(MinorTrapHugetlbTest, EveryByteIsTheSnapshots) {
  const bool fault_all = GetParam();
  const uint64_t per_huge = kHugePageSize2M / kPageSize4K;
  constexpr uint64_t kHugePages = 6;
  HugePageReservation reservation(kHugePages);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  // Huge pages: data, zero, zero, zero, data, data.
  SnapshotFile snapshot(kHugePages * per_huge, [&](uint64_t p) {
    const uint64_t huge = p / per_huge;
    return huge >= 1 && huge <= 3;
  });
  auto file = MemoryFile::Create(
      {.size_bytes = kHugePages * kHugePageSize2M, .backend = MemoryBackend::kHugetlb});
  if (!file && file.error().code() == ErrorCode::kUnsupported) {
    GTEST_SKIP() << file.error().ToString();
  }
  ASSERT_TRUE(file.has_value()) << file.error().ToString();
  auto mapping = (*file)->Map();
  ASSERT_TRUE(mapping.has_value()) << mapping.error().ToString();
  auto uffd = Userfaultfd::Create(
      {.required_features = kUffdFeatureMinorHugetlbfs | kUffdFeatureMissingHugetlbfs});
  if (!uffd && uffd.error().code() == ErrorCode::kUnsupported) {
    GTEST_SKIP() << uffd.error().ToString();
  }
  ASSERT_TRUE(uffd.has_value()) << uffd.error().ToString();
  ASSERT_TRUE(uffd->Register(mapping->host_address(), mapping->size(),
                             UffdModes::kMissing | UffdModes::kMinor));
  auto layout = GuestLayout::Create({GuestRegion{GuestPhysAddr(0), mapping->size(), FileOffset(0),
                                                 mapping->host_address(), kHugePageSize2M}});
  ASSERT_TRUE(layout.has_value());
  FaultHandlerOptions options;
  options.mode = InstallMode::kMinorTrap;
  options.memory_file = *file;
  options.fill = fault_all ? FillMode::kAtFirstFault : FillMode::kNone;
  auto handler =
      FaultHandler::Create(std::move(*uffd), std::move(*layout), OpenSource(snapshot), options);
  ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
  auto engine = StartEngine(1);
  auto id = engine->AddSpace(std::move(*handler));
  ASSERT_TRUE(id.has_value());
  auto page = [&](uint64_t p) {
    return reinterpret_cast<const uint8_t*>(mapping->data()) + p * kPageSize4K;
  };
  if (fault_all) {
    ASSERT_EQ(snapshot.CheckPage(0, page(0)), "");
    ASSERT_GT(StatsWhen(*engine, *id, [](const FaultStats& s) { return s.fill_finished_ns > 0; })
                  .fill_finished_ns,
              0u);
  }
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t p = static_cast<uint64_t>(t) * 7; p < snapshot.pages(); p += 13) {
        if (!snapshot.CheckPage(p, page(p)).empty()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    ASSERT_EQ(snapshot.CheckPage(p, page(p)), "") << (fault_all ? "fault-all" : "on demand");
  }
  // A second mapping, which no uffd watches, sees the same bytes: they are in the file.
  auto second = (*file)->Map();
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  for (uint64_t p = 0; p < snapshot.pages(); p += per_huge / 2) {
    const auto* data = reinterpret_cast<const uint8_t*>(second->data()) + p * kPageSize4K;
    EXPECT_EQ(snapshot.CheckPage(p, data), "");
  }
  const FaultStats stats = *engine->Stats(*id);
  EXPECT_EQ(stats.pages_installed(), snapshot.pages());
  EXPECT_EQ(stats.pages_zeroed, 3 * per_huge);
  if (fault_all) {
    EXPECT_EQ(stats.faults(), 1u);
  }
}

INSTANTIATE_TEST_SUITE_P(OnDemandAndFaultAll, MinorTrapHugetlbTest, ::testing::Bool(),
                         [](const auto& param) { return param.param ? "fault_all" : "on_demand"; });

}  // namespace
}  // namespace guestmem
