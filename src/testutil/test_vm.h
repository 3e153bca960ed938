// Test VMs for the fault pipeline's tests: guest memory mapped in this process as Firecracker
// maps it (or in a forked child process, as in production), registered with a uffd, with the
// layout that describes it; plus serving helpers and waits with deadlines.
//
// Thread safety: helpers for one test; the memory of a TestVm may be touched from any thread.
#ifndef GUESTMEM_TESTUTIL_TEST_VM_H_
#define GUESTMEM_TESTUTIL_TEST_VM_H_

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/mapping.h"
#include "guestmem/page_source.h"
#include "guestmem/userfaultfd.h"
#include "testutil/snapshot_file.h"

namespace guestmem::testutil {

// Waits until `done()` holds or `timeout` passes; returns whether it held. Polls every ms.
template <typename Done>
bool WaitUntil(Done done, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// A VM's guest memory in this process: regions mapped as Firecracker maps them and registered
// with a uffd, with the layout describing them.
struct TestVm {
  std::vector<Mapping> regions;
  std::vector<uint64_t> region_file_offsets;
  GuestLayout layout;
  Userfaultfd uffd;

  uint8_t* PageAt(uint64_t file_page) const {
    const uint64_t offset = file_page * kPageSize4K;
    for (size_t i = 0; i < regions.size(); ++i) {
      if (offset >= region_file_offsets[i] && offset < region_file_offsets[i] + regions[i].size()) {
        return reinterpret_cast<uint8_t*>(regions[i].bytes() + (offset - region_file_offsets[i]));
      }
    }
    return nullptr;
  }
};

// Anonymous private regions of the given sizes (bytes), back to back in the snapshot, with a
// 1 GiB gap between them in guest addresses.
inline TestVm MapAnonymousVm(const std::vector<uint64_t>& sizes, uint64_t page_size = kPageSize4K,
                             uint64_t optional_features = 0, UffdModes modes = UffdModes::kMissing,
                             uint64_t required_features = kUffdFeatureEventRemove) {
  UffdOptions uffd_options;
  uffd_options.required_features = required_features;
  uffd_options.optional_features = optional_features;
  auto uffd = Userfaultfd::Create(uffd_options);
  EXPECT_TRUE(uffd.has_value()) << uffd.error().ToString();
  std::vector<Mapping> maps;
  std::vector<GuestRegion> regions;
  std::vector<uint64_t> offsets;
  uint64_t file_offset = 0;
  uint64_t guest = 0;
  for (uint64_t size : sizes) {
    int flags = MAP_NORESERVE | (page_size == kHugePageSize2M ? MAP_HUGETLB : 0);
    auto map = Mapping::Anonymous(size, flags);
    EXPECT_TRUE(map.has_value()) << map.error().ToString();
    auto registered = uffd->Register(HostVirtAddr(map->address()), size, modes);
    EXPECT_TRUE(registered.has_value()) << registered.error().ToString();
    regions.push_back(GuestRegion{GuestPhysAddr(guest), size, FileOffset(file_offset),
                                  HostVirtAddr(map->address()), page_size});
    offsets.push_back(file_offset);
    maps.push_back(std::move(*map));
    file_offset += size;
    guest += size + (uint64_t{1} << 30);
  }
  auto layout = GuestLayout::Create(regions);
  EXPECT_TRUE(layout.has_value()) << layout.error().ToString();
  return TestVm{std::move(maps), std::move(offsets), std::move(*layout), std::move(*uffd)};
}

inline std::shared_ptr<const PageSource> OpenSource(const SnapshotFile& snapshot,
                                                    Os* os = nullptr) {
  auto source = RawFileSource::Open(snapshot.path(), os);
  EXPECT_TRUE(source.has_value()) << source.error().ToString();
  return std::shared_ptr<const PageSource>(std::move(*source));
}

inline std::unique_ptr<FaultEngine> StartEngine(FaultEngineOptions options) {
  auto engine = FaultEngine::Start(options);
  EXPECT_TRUE(engine.has_value()) << engine.error().ToString();
  return std::move(*engine);
}
inline std::unique_ptr<FaultEngine> StartEngine(unsigned workers = 2) {
  return StartEngine(FaultEngineOptions{.workers = workers});
}

inline std::unique_ptr<FaultHandler> MakeHandler(TestVm& vm,
                                                 std::shared_ptr<const PageSource> source,
                                                 FaultHandlerOptions options = {}) {
  auto handler =
      FaultHandler::Create(std::move(vm.uffd), vm.layout, std::move(source), std::move(options));
  EXPECT_TRUE(handler.has_value()) << handler.error().ToString();
  return handler ? std::move(*handler) : nullptr;
}

// Options with a window per fault (kDefaultFaultAroundBytes), for tests that count windows.
inline FaultHandlerOptions FixedWindows() {
  FaultHandlerOptions options;
  options.adaptive_windows = false;
  return options;
}

inline SpaceId Serve(FaultEngine& engine, TestVm& vm, std::shared_ptr<const PageSource> source,
                     FaultHandlerOptions options = {}) {
  auto id = engine.AddSpace(MakeHandler(vm, std::move(source), std::move(options)));
  EXPECT_TRUE(id.has_value()) << id.error().ToString();
  return id.value_or(0);
}

// The space's statistics once `settled` holds for them. The handler counts an install after
// the ioctl that already woke the faulting thread, so a test that has just touched memory can be
// a moment ahead of the counters. Gives the last statistics seen if `settled` never holds in 20 s.
template <typename Settled>
FaultStats StatsWhen(const FaultEngine& engine, SpaceId id, Settled settled) {
  FaultStats stats = engine.Stats(id).value_or(FaultStats{});
  WaitUntil([&] {
    stats = engine.Stats(id).value_or(FaultStats{});
    return settled(stats);
  });
  return stats;
}

// Reads every page of the VM and compares it with the snapshot; returns the mismatches.
inline int VerifyAll(const TestVm& vm, const SnapshotFile& snapshot) {
  int bad = 0;
  for (uint64_t p = 0; p < snapshot.pages(); ++p) {
    std::string err = snapshot.CheckPage(p, vm.PageAt(p));
    if (!err.empty() && bad++ < 5) ADD_FAILURE() << err;
  }
  return bad;
}

// What a space's on_closed callback was told.
class ClosedWatch {
 public:
  FaultEngine::ClosedCallback Callback() {
    return [this](SpaceId, const Status& why, const FaultStats& stats) {
      std::lock_guard lock(mu_);
      why_ = why;
      stats_ = stats;
      ++closed_;
    };
  }
  bool WaitClosed(int count = 1) {
    return WaitUntil([&] {
      std::lock_guard lock(mu_);
      return closed_ >= count;
    });
  }
  int closed() const {
    std::lock_guard lock(mu_);
    return closed_;
  }
  Status why() const {
    std::lock_guard lock(mu_);
    return why_;
  }
  FaultStats stats() const {
    std::lock_guard lock(mu_);
    return stats_;
  }

 private:
  mutable std::mutex mu_;
  int closed_ = 0;
  Status why_;
  FaultStats stats_;
};

// An engine that checks quiet VMs often, so that a VM's exit is noticed in milliseconds.
inline FaultEngineOptions QuickLiveness(unsigned workers = 1) {
  return FaultEngineOptions{.workers = workers, .liveness_interval = std::chrono::milliseconds(20)};
}

// --- a VM in another process, as in production ------------------------------------------------

struct ChildVmOptions {
  uint64_t features = kUffdFeatureEventRemove;  // required
  uint64_t optional_features = kUffdFeaturePoison;
  uint64_t registered_pages = 0;  // > pages: registers more than the handshake declares
};

// Forks a child that maps `pages` anonymous pages, registers them with a uffd, sends the
// handshake over `sock`, then runs `body(memory, uffd)` and exits with its result.
template <typename Body>
pid_t ForkVm(int sock, uint64_t pages, Body body, ChildVmOptions options = {}) {
  pid_t pid = fork();
  if (pid != 0) return pid;
  const uint64_t size = pages * kPageSize4K;
  const uint64_t registered = std::max(options.registered_pages, pages) * kPageSize4K;
  void* mem = mmap(nullptr, registered, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  auto uffd = Userfaultfd::Create(
      {.required_features = options.features, .optional_features = options.optional_features});
  if (mem == MAP_FAILED || !uffd ||
      !uffd->Register(HostVirtAddr(reinterpret_cast<uint64_t>(mem)), registered,
                      UffdModes::kMissing)) {
    _exit(90);
  }
  HandshakeRegion region{reinterpret_cast<uint64_t>(mem),
                         size,
                         0,
                         kPageSize4K,
                         kPageSize4K,
                         std::nullopt,
                         std::nullopt};
  int fds[] = {uffd->fd()};
  if (!SendHandshake(sock, std::span(&region, 1), fds)) _exit(91);
  _exit(body(static_cast<volatile uint8_t*>(mem), *uffd));
}

inline std::unique_ptr<FaultHandler> ReceiveVm(int sock, std::shared_ptr<const PageSource> source,
                                               FaultHandlerOptions options = {}) {
  auto received = ReceiveHandshake(sock, std::chrono::seconds(10));
  EXPECT_TRUE(received.has_value()) << received.error().ToString();
  if (!received) return nullptr;
  const HandshakeRegion& r = received->regions.at(0);
  auto layout =
      GuestLayout::Create({GuestRegion{GuestPhysAddr(0), r.size, FileOffset(r.offset),
                                       HostVirtAddr(r.base_host_virt_addr), r.page_size}});
  auto uffd = Userfaultfd::Adopt(std::move(received->fds.at(0)));
  EXPECT_TRUE(uffd.has_value());
  auto handler = FaultHandler::Create(std::move(*uffd), std::move(*layout), std::move(source),
                                      std::move(options));
  EXPECT_TRUE(handler.has_value()) << handler.error().ToString();
  return handler ? std::move(*handler) : nullptr;
}

// The child's wait status, or std::nullopt if it did not end within `timeout` (then it is killed
// and reaped).
inline std::optional<int> WaitChild(pid_t pid,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  int status = 0;
  const bool ended = WaitUntil([&] { return waitpid(pid, &status, WNOHANG) == pid; }, timeout);
  if (ended) return status;
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return std::nullopt;
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_TEST_VM_H_
