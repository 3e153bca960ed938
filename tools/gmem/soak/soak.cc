#include "soak/soak.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/hex.h"
#include "base/open_fds.h"
#include "base/temp_dir.h"
#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/log.h"
#include "guestmem/page_source.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfaultfd.h"
#include "sim/random.h"
#include "soak/content.h"
#include "soak/failing_source_os.h"
#include "soak/guest.h"
#include "soak/launcher.h"
#include "soak/vm_slot.h"

namespace guestmem::soak {
namespace {

using Clock = std::chrono::steady_clock;

constexpr struct {
  Injection bit;
  const char* name;
} kInjectionNames[] = {
    {kInjectBalloon, "balloon"}, {kInjectMunmap, "munmap"},   {kInjectFork, "fork"},
    {kInjectKill, "kill"},       {kInjectIoError, "ioerror"},
};

constexpr unsigned kMaxVms = 64;
constexpr uint64_t kRegionGap = kHugePageSize2M;
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
constexpr auto kStatusInterval = std::chrono::seconds(10);
constexpr size_t kLogLinesKept = 20;

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// "12,345,678"
std::string Count(uint64_t n) {
  const std::string digits = std::to_string(n);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

std::string Bytes(uint64_t n) {
  char buf[32];
  if (n >= (uint64_t{1} << 30)) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", static_cast<double>(n) / (1 << 30));
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(n) / (1 << 20));
  }
  return buf;
}

std::string WaitStatusText(int status) {
  if (WIFEXITED(status)) return "exited " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* name = sigabbrev_np(WTERMSIG(status));
    return std::string("died of SIG") + (name != nullptr ? name : std::to_string(WTERMSIG(status)));
  }
  return "wait status " + std::to_string(status);
}

// Writes the snapshot: data pages written, holes left sparse.
Status WriteSnapshot(const std::string& path, uint64_t pages, std::optional<uint64_t> corrupt) {
  UniqueFd fd(open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600));
  if (!fd) return PosixError(errno, "create snapshot " + path);
  if (ftruncate(fd.get(), static_cast<off_t>(pages * kPageSize4K)) != 0) {
    return PosixError(errno, "size snapshot " + path);
  }
  std::vector<uint64_t> run;
  uint64_t run_first = 0;
  auto flush = [&]() -> Status {
    if (run.empty()) return OkStatus();
    const size_t bytes = run.size() * sizeof(uint64_t);
    const ssize_t n =
        pwrite(fd.get(), run.data(), bytes, static_cast<off_t>(run_first * kPageSize4K));
    if (n != static_cast<ssize_t>(bytes)) return PosixError(n < 0 ? errno : EIO, "write " + path);
    run.clear();
    return OkStatus();
  };
  for (uint64_t p = 0; p < pages; ++p) {
    if (IsHolePage(p) || run.size() >= 256 * kWordsPerPage) GM_RETURN_IF_ERROR(flush());
    if (IsHolePage(p)) continue;
    if (run.empty()) run_first = p;
    for (uint64_t w = 0; w < kWordsPerPage; ++w) run.push_back(SnapshotWord(p, w));
  }
  GM_RETURN_IF_ERROR(flush());
  if (corrupt && *corrupt < pages) {
    const off_t at = static_cast<off_t>(*corrupt * kPageSize4K + 100);
    uint8_t byte = 0;
    if (pread(fd.get(), &byte, 1, at) != 1) return PosixError(errno, "read " + path);
    byte ^= 0x20;
    if (pwrite(fd.get(), &byte, 1, at) != 1) return PosixError(errno, "corrupt " + path);
  }
  return OkStatus();
}

// vm.nr_hugepages raised for the run, put back afterwards. The sysctl file stays locked meanwhile
// (flock), as the tests' huge page reservations lock it, so that two runs never undo each other.
class HugePagePool {
 public:
  ~HugePagePool() {
    if (raised_) Write(old_);
  }
  Status Raise(uint64_t by) {
    fd_.reset(open(kPath, O_RDWR | O_CLOEXEC));
    if (!fd_) return PosixError(errno, std::string("open ") + kPath);
    if (flock(fd_.get(), LOCK_EX) != 0) return PosixError(errno, std::string("lock ") + kPath);
    old_ = Read();
    if (!Write(old_ + by)) return PosixError(errno, "raise vm.nr_hugepages");
    raised_ = true;
    return OkStatus();
  }
  static uint64_t Free() {
    UniqueFd fd(
        open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", O_RDONLY | O_CLOEXEC));
    char text[32] = {};
    if (!fd || read(fd.get(), text, sizeof(text) - 1) <= 0) return 0;
    return std::strtoull(text, nullptr, 10);
  }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  uint64_t Read() const {
    char text[32] = {};
    if (pread(fd_.get(), text, sizeof(text) - 1, 0) <= 0) return 0;
    return std::strtoull(text, nullptr, 10);
  }
  bool Write(uint64_t value) const {
    const std::string text = std::to_string(value);
    return pwrite(fd_.get(), text.data(), text.size(), 0) == static_cast<ssize_t>(text.size());
  }
  UniqueFd fd_;
  uint64_t old_ = 0;
  bool raised_ = false;
};

// Sums of what the VMs reported.
struct VmTotals {
  uint64_t vms = 0, huge_vms = 0, kills = 0;
  uint64_t bytes_verified = 0, balloons = 0, balloon_units = 0, storms = 0, munmaps = 0, forks = 0;
  uint64_t sigbus = 0, sigsegv = 0;

  void Add(const VmSlot& s) {
    bytes_verified += s.bytes_verified.load();
    balloons += s.balloons.load();
    balloon_units += s.balloon_units.load();
    storms += s.storms.load();
    munmaps += s.munmaps.load();
    forks += s.forks.load();
    sigbus += s.sigbus.load();
    sigsegv += s.sigsegv.load();
  }
};

void AddStats(FaultStats* sum, const FaultStats& s) {
  sum->faults_missing += s.faults_missing;
  sum->faults_minor += s.faults_minor;
  sum->faults_write_protect += s.faults_write_protect;
  sum->events_remove += s.events_remove;
  sum->events_unmap += s.events_unmap;
  sum->events_remap += s.events_remap;
  sum->events_fork += s.events_fork;
  sum->pages_copied += s.pages_copied;
  sum->pages_continued += s.pages_continued;
  sum->pages_zeroed += s.pages_zeroed;
  sum->pages_poisoned += s.pages_poisoned;
  sum->bytes_read += s.bytes_read;
  sum->eagain_retries += s.eagain_retries;
  sum->latency_max_ns = std::max(sum->latency_max_ns, s.latency_max_ns);
}

class Driver {
 public:
  Driver(const SoakOptions& options, std::FILE* out) : o_(options), out_(out) {}
  ~Driver();
  int Run();
  SoakSummary Summary() const;

 private:
  struct Vm {
    uint32_t index = 0;
    uint32_t slot = 0;
    uint64_t page_size = kPageSize4K;
    pid_t pid = 0;
    UniqueFd socket;
    std::optional<SpaceId> space;
    bool space_closed = false;
    std::string closed_why;
    uint64_t kill_at = 0;  // progress at which to kill it; 0: never
    bool killed = false;
    Clock::time_point started;
    Clock::time_point progressed;
    uint64_t progress = 0;
  };
  struct Closed {
    uint32_t vm;
    SpaceId id;
    std::string why;
    FaultStats stats;
  };

  Status Setup();
  int VmMain(const SpawnRequest& request);
  Status SpawnNext();
  void Serve(Vm& vm, UniqueFd socket);
  void AcceptAll();
  void ReadLauncher();
  void OnExited(uint32_t index, pid_t pid, int status);
  void ReleaseSpace(Vm& vm);
  void TakeClosed();
  void Tick();
  bool Exercised(uint32_t injection) const;
  uint64_t FaultsSoFar() const;
  std::string DescribeVm(const Vm& vm) const;
  void Fail(const std::string& why);
  void Shutdown();
  void CheckLeaks();
  void PrintStatus();
  void PrintReport();

  VmSlot& slot(uint32_t i) const { return slots_[i]; }

  const SoakOptions o_;
  std::FILE* const out_;
  uint32_t inject_ = 0;
  std::vector<std::string> notes_;
  std::optional<std::string> failure_;

  TempDir dir_;
  std::string snapshot_path_;
  std::string socket_path_;
  HugePagePool huge_pool_;
  bool huge_ok_ = false;
  VmSlot* slots_ = nullptr;
  size_t slots_bytes_ = 0;
  std::vector<bool> slot_used_;
  UniqueFd listener_;
  std::unique_ptr<Launcher> launcher_;
  std::unique_ptr<FailingSourceOs> failing_os_;
  std::shared_ptr<const PageSource> source_;
  std::unique_ptr<FaultEngine> engine_;

  std::map<uint32_t, Vm> vms_;         // live, by index
  std::map<pid_t, UniqueFd> pending_;  // connections from VMs whose pid is not known yet
  uint32_t next_index_ = 0;
  bool stopping_ = false;
  Clock::time_point start_;
  double seconds_ = 0;  // the time budget (0: none)
  Clock::time_point stop_at_;
  Clock::time_point stopping_since_;
  Clock::time_point next_status_;
  VmTotals totals_;
  int fds_before_ = 0;
  int fds_after_ = 0;
  size_t spaces_after_ = 0;

  mutable std::mutex mu_;  // guards the three below: on_closed runs on engine threads
  std::vector<Closed> closed_;
  std::set<SpaceId> vm_spaces_;  // every VM's own space; the others are forked children's
  FaultStats served_;            // spaces that ended
  uint64_t fork_spaces_closed_ = 0;
  std::deque<std::string> log_lines_;  // the last few, for a failure report
};

Driver::~Driver() {
  engine_.reset();
  launcher_.reset();
  SetLogSink({});
  if (slots_ != nullptr) munmap(slots_, slots_bytes_);
}

int Driver::VmMain(const SpawnRequest& request) {
  GuestSpec spec;
  spec.index = request.index;
  spec.seed = request.seed;
  spec.socket_path = socket_path_;
  spec.memory_bytes = o_.memory_mib << 20;
  spec.page_size = request.page_size;
  spec.regions = request.regions;
  spec.region_gap = kRegionGap;
  spec.threads = o_.threads;
  spec.operations = request.operations;
  spec.balloon = (inject_ & kInjectBalloon) != 0;
  spec.munmap = (inject_ & kInjectMunmap) != 0;
  spec.fork = (inject_ & kInjectFork) != 0;
  spec.failing_permille = (inject_ & kInjectIoError) != 0 ? o_.ioerror_permille : 0;
  return RunGuest(spec, &slot(request.slot));
}

Status Driver::Setup() {
  inject_ = o_.inject;
  auto probe = Userfaultfd::Probe();
  if (!probe) return std::move(probe).error().WithContext("soak: userfaultfd");
  if ((inject_ & kInjectFork) != 0) {
    // The kernel may offer EVENT_FORK and still refuse it to a process without CAP_SYS_PTRACE.
    auto with_fork = Userfaultfd::Create({.required_features = kUffdFeatureEventFork});
    if (!with_fork) {
      inject_ &= ~kInjectFork;
      notes_.push_back(
          "fork: not injected (UFFD_FEATURE_EVENT_FORK: " + with_fork.error().ToString() + ")");
    }
  }
  if ((inject_ & kInjectIoError) != 0 && (probe->features & kUffdFeaturePoison) == 0) {
    inject_ &= ~kInjectIoError;
    notes_.push_back("ioerror: not injected (the kernel has no UFFDIO_POISON to answer with)");
  }
  if (dir_.path().empty()) return Error(ErrorCode::kInternal, "soak: no temporary directory");
  snapshot_path_ = dir_.File("snapshot.mem");
  socket_path_ = dir_.File("soak.sock");
  const uint64_t memory = o_.memory_mib << 20;
  GM_RETURN_IF_ERROR(WriteSnapshot(snapshot_path_, memory / kPageSize4K, o_.corrupt_page));

  if (o_.huge_pages) {
    if (o_.reserve_huge_pages > 0) GM_RETURN_IF_ERROR(huge_pool_.Raise(o_.reserve_huge_pages));
    // Half the VMs at a time, each with its memory and as much again for a forked child's faults.
    const uint64_t needed = (o_.vms + 1) / 2 * 2 * (memory / kHugePageSize2M) + 8;
    const uint64_t free_pages = HugePagePool::Free();
    huge_ok_ = free_pages >= needed;
    if (!huge_ok_) {
      notes_.push_back("2 MiB pages: not used (" + std::to_string(free_pages) + " free, " +
                       std::to_string(needed) + " needed: --reserve-huge-pages " +
                       std::to_string(needed) + ")");
    }
  }

  slots_bytes_ = sizeof(VmSlot) * kMaxVms;
  void* shared =
      mmap(nullptr, slots_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) return PosixError(errno, "soak: map the VM slots");
  slots_ = static_cast<VmSlot*>(shared);
  for (unsigned i = 0; i < kMaxVms; ++i) new (&slots_[i]) VmSlot();
  slot_used_.assign(kMaxVms, false);

  GM_ASSIGN_OR_RETURN(listener_, ListenUnix(socket_path_));
  // Before any thread exists in this process (the engine's, the log sink's users).
  GM_ASSIGN_OR_RETURN(
      launcher_, Launcher::Start([this](const SpawnRequest& request) { return VmMain(request); }));

  Os* source_os = nullptr;
  if ((inject_ & kInjectIoError) != 0) {
    failing_os_ = std::make_unique<FailingSourceOs>(o_.ioerror_permille);
    source_os = failing_os_.get();
  }
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> source,
                      RawFileSource::Open(snapshot_path_, source_os));
  source_ = std::move(source);

  SetLogSink(
      [this](LogLevel level, std::string_view message) {
        std::string line = std::string(LogLevelName(level)) + " " + std::string(message);
        if (o_.verbose) std::fprintf(stderr, "%s\n", line.c_str());
        std::lock_guard lock(mu_);
        log_lines_.push_back(std::move(line));
        if (log_lines_.size() > kLogLinesKept) log_lines_.pop_front();
      },
      o_.verbose ? LogLevel::kDebug : LogLevel::kInfo);
  GM_ASSIGN_OR_RETURN(engine_, FaultEngine::Start({.workers = o_.workers}));
  fds_before_ = CountOpenFds();
  return OkStatus();
}

Status Driver::SpawnNext() {
  uint32_t free_slot = 0;
  while (free_slot < kMaxVms && slot_used_[free_slot]) ++free_slot;
  if (free_slot == kMaxVms) return Error(ErrorCode::kResourceExhausted, "soak: no free VM slot");
  slot_used_[free_slot] = true;
  new (&slot(free_slot)) VmSlot();
  const uint32_t index = next_index_++;
  sim::SplitMix64 rng(Mix64(o_.seed * 0x100000001b3ULL + index));
  SpawnRequest request;
  request.index = index;
  request.slot = free_slot;
  request.seed = rng.Next();
  request.page_size = huge_ok_ && index % 2 == 1 ? kHugePageSize2M : kPageSize4K;
  request.regions = static_cast<uint32_t>(rng.Between(1, o_.max_regions));
  // Every operation on a 2 MiB page checks 512 times the bytes: fewer of them, for a VM that
  // lives about as long.
  request.operations = request.page_size == kHugePageSize2M
                           ? std::max<uint64_t>(o_.operations / 8, 100)
                           : o_.operations;
  Vm vm;
  vm.index = index;
  vm.slot = free_slot;
  vm.page_size = request.page_size;
  vm.started = vm.progressed = Clock::now();
  // A third of the VMs are killed, somewhere between 5% and 95% of the way.
  if ((inject_ & kInjectKill) != 0 && index % 3 == 1) {
    vm.kill_at = request.operations / 20 + rng.Below(request.operations * 9 / 10 + 1);
  }
  ++totals_.vms;
  if (vm.page_size == kHugePageSize2M) ++totals_.huge_vms;
  vms_.emplace(index, std::move(vm));
  return launcher_->Spawn(request);
}

void Driver::Serve(Vm& vm, UniqueFd socket) {
  auto fail = [&](const Error& e) {
    Fail("the daemon cannot serve vm " + std::to_string(vm.index) + ": " + e.ToString());
  };
  auto received = ReceiveHandshake(socket.get(), kHandshakeTimeout);
  if (!received) return fail(received.error());
  if (Status valid = ValidateHandshake(received->regions, source_->size()); !valid) {
    return fail(valid.error());
  }
  std::vector<GuestRegion> regions;
  for (const HandshakeRegion& r : received->regions) {
    regions.push_back(GuestRegion{GuestPhysAddr(r.offset), r.size, FileOffset(r.offset),
                                  HostVirtAddr(r.base_host_virt_addr), r.page_size});
  }
  auto layout = GuestLayout::Create(std::move(regions));
  if (!layout) return fail(layout.error());
  auto uffd = Userfaultfd::Adopt(std::move(received->fds[0]));
  if (!uffd) return fail(uffd.error());
  FaultHandlerOptions options;
  options.name = "vm " + std::to_string(vm.index);
  options.fault_around_bytes = o_.fault_around_kib << 10;
  options.fill = o_.fault_all         ? FillMode::kAtFirstFault
                 : o_.background_fill ? FillMode::kBackground
                                      : FillMode::kNone;
  auto handler =
      FaultHandler::Create(std::move(*uffd), std::move(*layout), source_, std::move(options));
  if (!handler) return fail(handler.error());
  const uint32_t index = vm.index;
  auto id = engine_->AddSpace(
      std::move(*handler), [this, index](SpaceId space, const Status& why, const FaultStats& s) {
        std::lock_guard lock(mu_);
        closed_.push_back(Closed{index, space, why ? "removed" : why.error().ToString(), s});
      });
  if (!id) return fail(id.error());
  {
    std::lock_guard lock(mu_);
    vm_spaces_.insert(*id);
  }
  vm.space = *id;
  vm.socket = std::move(socket);
}

void Driver::AcceptAll() {
  while (!failure_) {
    UniqueFd socket(accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!socket) return;  // EAGAIN: nobody else waiting
    auto peer = GetPeerCredentials(socket.get());
    if (!peer) continue;
    auto it = std::find_if(vms_.begin(), vms_.end(),
                           [&](const auto& entry) { return entry.second.pid == peer->pid; });
    if (it == vms_.end()) {
      pending_[peer->pid] = std::move(socket);  // the launcher has not said whose pid it is yet
      continue;
    }
    Serve(it->second, std::move(socket));
  }
}

void Driver::ReadLauncher() {
  while (!failure_) {
    auto event = launcher_->Next();
    if (!event) return Fail(event.error().ToString());
    if (!event->has_value()) return;
    const LauncherEvent& e = **event;
    auto it = vms_.find(e.index);
    if (it == vms_.end()) continue;
    if (e.kind == LauncherEvent::Kind::kSpawned) {
      it->second.pid = e.pid;
      if (auto waiting = pending_.find(e.pid); waiting != pending_.end()) {
        UniqueFd socket = std::move(waiting->second);
        pending_.erase(waiting);
        Serve(it->second, std::move(socket));
      }
    } else {
      OnExited(e.index, e.pid, e.status);
    }
  }
}

void Driver::ReleaseSpace(Vm& vm) {
  vm.socket.reset();
  TakeClosed();
  if (vm.space && !vm.space_closed) {
    (void)engine_->RemoveSpace(*vm.space);  // kNotFound: it ended by itself meanwhile
    TakeClosed();
  }
}

void Driver::OnExited(uint32_t index, pid_t pid, int status) {
  Vm& vm = vms_.at(index);
  const VmSlot& s = slot(vm.slot);
  totals_.Add(s);
  const std::string who = "vm " + std::to_string(index) + " (pid " + std::to_string(pid) + ")";
  if (pid < 0) {
    Fail("the launcher could not fork vm " + std::to_string(index) + ": " + strerror(status));
  } else if (WIFEXITED(status) && WEXITSTATUS(status) == kGuestExitFailed) {
    Fail(s.failure);
  } else if (WIFEXITED(status) && WEXITSTATUS(status) == kGuestExitSetup) {
    Fail(std::string("vm could not start: ") + s.failure);
  } else if (vm.killed && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    // As planned.
  } else if (!(WIFEXITED(status) && WEXITSTATUS(status) == kGuestExitOk)) {
    Fail(who + " " + WaitStatusText(status) + " unexpectedly; " + DescribeVm(vm));
  }
  ReleaseSpace(vm);
  slot_used_[vm.slot] = false;
  vms_.erase(index);
}

void Driver::TakeClosed() {
  std::vector<Closed> closed;
  {
    std::lock_guard lock(mu_);
    closed.swap(closed_);
    for (const Closed& c : closed) {
      AddStats(&served_, c.stats);
      if (vm_spaces_.count(c.id) == 0) ++fork_spaces_closed_;  // a forked child's space
    }
  }
  for (Closed& c : closed) {
    auto it = vms_.find(c.vm);
    if (it != vms_.end() && it->second.space == c.id) {
      it->second.space_closed = true;
      it->second.closed_why = c.why;
    }
  }
}

uint64_t Driver::FaultsSoFar() const {
  uint64_t faults = 0;
  {
    std::lock_guard lock(mu_);
    faults = served_.faults();
  }
  for (const auto& [index, vm] : vms_) {
    if (vm.space && !vm.space_closed)
      faults += engine_->Stats(*vm.space).value_or(FaultStats{}).faults();
  }
  return faults;
}

bool Driver::Exercised(uint32_t injection) const {
  VmTotals t = totals_;
  for (const auto& [index, vm] : vms_) t.Add(slot(vm.slot));
  switch (injection) {
    case kInjectBalloon:
      return t.balloons > 0;
    case kInjectMunmap:
      return t.munmaps > 0;
    case kInjectFork:
      return t.forks > 0;
    case kInjectKill:
      return totals_.kills > 0;
    case kInjectIoError:
      return t.sigbus > 0;
    default:
      return true;
  }
}

std::string Driver::DescribeVm(const Vm& vm) const {
  const VmSlot& s = slot(vm.slot);
  std::string text = std::to_string(s.progress.load()) + " operations done";
  if (s.handed_over.load() == 0) text += ", memory never handed over";
  text += "; threads:";
  for (unsigned t = 0; t <= o_.threads; ++t) {
    const unsigned entry = t == o_.threads ? kMaxVmThreads : t;
    const auto op = static_cast<VmOp>(s.doing[entry].op.load());
    text += std::string(" ") + (t == o_.threads ? "main" : std::to_string(t)) + " " + VmOpName(op);
    if (op != VmOp::kIdle && op != VmOp::kDone)
      text += " of page " + Hex(s.doing[entry].unit.load());
    text += t == o_.threads ? "" : ",";
  }
  if (!vm.space) {
    text += "; the daemon has no space for it";
  } else if (vm.space_closed) {
    text += "; its space was closed by the fault engine: " + vm.closed_why;
  } else {
    const FaultStats stats = engine_->Stats(*vm.space).value_or(FaultStats{});
    text += "; its space is served: " + stats.ToString();
  }
  return text;
}

void Driver::Fail(const std::string& why) {
  if (!failure_) failure_ = why;
}

void Driver::Tick() {
  const auto now = Clock::now();
  for (auto& [index, vm] : vms_) {
    VmSlot& s = slot(vm.slot);
    const uint64_t progress = s.progress.load();
    if (progress != vm.progress) {
      vm.progress = progress;
      vm.progressed = now;
    } else if (SecondsSince(vm.progressed) > o_.hang_seconds) {
      char seconds[32];
      std::snprintf(seconds, sizeof(seconds), "%.1f", SecondsSince(vm.progressed));
      return Fail("hang: vm " + std::to_string(index) + " (pid " + std::to_string(vm.pid) +
                  ") made no progress for " + seconds + " s: " + DescribeVm(vm));
    }
    const bool kill_now = vm.kill_at != 0 && progress >= vm.kill_at;
    // A run about to end without a kill kills someone now.
    const bool kill_late = stopping_ && (inject_ & kInjectKill) != 0 && totals_.kills == 0;
    if (!vm.killed && vm.pid > 0 && vm.space && (kill_now || kill_late)) {
      kill(-vm.pid, SIGKILL);
      vm.killed = true;
      ++totals_.kills;
    }
  }
  if (!stopping_) {
    const bool time_up = seconds_ > 0 && now >= stop_at_;
    const bool faults_up = o_.faults > 0 && FaultsSoFar() >= o_.faults;
    if (time_up || faults_up) {
      stopping_ = true;
      stopping_since_ = now;
    }
  }
  if (now >= next_status_) {
    PrintStatus();
    next_status_ = now + kStatusInterval;
  }
}

void Driver::PrintStatus() {
  std::fprintf(out_, "soak: %.0f s, %s faults, %s VMs started, %zu running\n", SecondsSince(start_),
               Count(FaultsSoFar()).c_str(), Count(totals_.vms).c_str(), vms_.size());
  std::fflush(out_);
}

void Driver::Shutdown() {
  for (auto& [index, vm] : vms_) {
    slot(vm.slot).stop.store(1);
    if (vm.pid > 0) kill(-vm.pid, SIGKILL);
  }
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  while (!vms_.empty() && Clock::now() < deadline) {
    auto event = launcher_->Next();
    if (!event) break;
    if (!event->has_value()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    const LauncherEvent& e = **event;
    auto it = vms_.find(e.index);
    if (it == vms_.end()) continue;
    if (e.kind == LauncherEvent::Kind::kSpawned) {
      it->second.pid = e.pid;
      kill(-e.pid, SIGKILL);
      continue;
    }
    totals_.Add(slot(it->second.slot));
    ReleaseSpace(it->second);
    vms_.erase(it);
  }
  pending_.clear();
}

void Driver::CheckLeaks() {
  pending_.clear();
  const auto deadline = Clock::now() + std::chrono::duration<double>(o_.leak_seconds);
  while (true) {
    TakeClosed();
    spaces_after_ = engine_->space_count();
    fds_after_ = CountOpenFds();
    if (spaces_after_ == 0 && fds_after_ == fds_before_) return;
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%.0f", o_.leak_seconds);
  Fail("leak: " + std::to_string(spaces_after_) + " space(s) still served and " +
       std::to_string(fds_after_ - fds_before_) + " more descriptor(s) open " + seconds +
       " s after every VM exited (descriptors " + std::to_string(fds_before_) +
       " before the first VM, " + std::to_string(fds_after_) +
       " after; spaces of forked children that ended: " + std::to_string(fork_spaces_closed_) +
       ", forks: " + std::to_string(totals_.forks) + ")");
}

int Driver::Run() {
  if (Status ready = Setup(); !ready) {
    std::fprintf(out_, "gmem soak: cannot run: %s\n", ready.error().ToString().c_str());
    return kSoakCannotRun;
  }
  seconds_ = o_.seconds == 0 && o_.faults == 0 ? 30 : o_.seconds;
  const double seconds = seconds_;
  std::string budget_text;
  if (seconds > 0) budget_text = std::to_string(static_cast<uint64_t>(seconds)) + " s";
  if (o_.faults > 0) {
    budget_text += (budget_text.empty() ? "" : " or ") + Count(o_.faults) + " faults";
  }
  std::fprintf(out_,
               "gmem soak: %s of %u VMs at a time (%u threads, %llu MiB in 1-%u regions, %llu "
               "operations each), fault-around %llu KiB%s, %u engine workers; injecting %s\n",
               budget_text.c_str(), o_.vms, o_.threads,
               static_cast<unsigned long long>(o_.memory_mib), o_.max_regions,
               static_cast<unsigned long long>(o_.operations),
               static_cast<unsigned long long>(o_.fault_around_kib),
               o_.fault_all ? " (fault-all)" : (o_.background_fill ? " (background fill)" : ""),
               o_.workers, InjectionList(inject_).c_str());
  for (const std::string& note : notes_) std::fprintf(out_, "  %s\n", note.c_str());
  std::fflush(out_);

  start_ = Clock::now();
  // A run over budget goes on until every injection happened once, for at most a minute more.
  const auto budget = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(seconds > 0 ? seconds : 1e9));
  stop_at_ = start_ + budget;
  next_status_ = start_ + kStatusInterval;
  bool stop_spawning = false;
  while (!failure_) {
    TakeClosed();
    if (stopping_ && !stop_spawning) {
      uint32_t missing = 0;
      for (const auto& [bit, name] : kInjectionNames) {
        if ((inject_ & bit) != 0 && !Exercised(bit)) missing |= bit;
      }
      if (missing == 0) {
        stop_spawning = true;
        for (auto& [index, vm] : vms_) slot(vm.slot).stop.store(1);
      } else if (Clock::now() >= stopping_since_ + std::chrono::seconds(60)) {
        Fail("injection(s) " + InjectionList(missing) + " never happened in " +
             std::to_string(static_cast<int>(SecondsSince(start_))) +
             " s: give the run a larger budget");
        break;
      }
    }
    if (stop_spawning && vms_.empty()) break;
    while (!stop_spawning && vms_.size() < o_.vms) {
      if (Status spawned = SpawnNext(); !spawned) {
        Fail(spawned.error().ToString());
        break;
      }
    }
    std::vector<pollfd> fds = {{listener_.get(), POLLIN, 0}, {launcher_->fd(), POLLIN, 0}};
    std::vector<uint32_t> owners;
    for (auto& [index, vm] : vms_) {
      if (!vm.socket) continue;
      fds.push_back({vm.socket.get(), POLLIN, 0});
      owners.push_back(index);
    }
    if (poll(fds.data(), fds.size(), 20) < 0 && errno != EINTR) {
      Fail(std::string("poll: ") + strerror(errno));
      break;
    }
    if (fds[1].revents != 0) ReadLauncher();
    if (fds[0].revents != 0) AcceptAll();
    for (size_t i = 2; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      auto it = vms_.find(owners[i - 2]);
      if (it != vms_.end()) ReleaseSpace(it->second);  // the VM hung up, as Firecracker exiting
    }
    Tick();
  }
  if (failure_) {
    Shutdown();
  } else {
    CheckLeaks();
  }
  const double elapsed = SecondsSince(start_);
  engine_.reset();  // spaces left (leaked) close now, their statistics with them
  TakeClosed();
  PrintReport();
  std::fprintf(out_, "  ran %.1f s\n", elapsed);
  if (failure_) {
    std::fprintf(out_, "FAIL: %s\n", failure_->c_str());
    std::lock_guard lock(mu_);
    if (!log_lines_.empty()) {
      std::fprintf(out_, "the daemon's last log lines:\n");
      for (const std::string& line : log_lines_) std::fprintf(out_, "  %s\n", line.c_str());
    }
    return kSoakFailed;
  }
  std::fprintf(out_, "PASS\n");
  return kSoakPassed;
}

void Driver::PrintReport() {
  FaultStats served;
  uint64_t fork_spaces = 0;
  {
    std::lock_guard lock(mu_);
    served = served_;
    fork_spaces = fork_spaces_closed_;
  }
  const VmTotals& t = totals_;
  std::fprintf(out_, "gmem soak: %s\n", failure_ ? "FAILED" : "passed");
  std::fprintf(out_, "  VMs: %s (%s on 2 MiB pages), %s killed; forked children served: %s\n",
               Count(t.vms).c_str(), Count(t.huge_vms).c_str(), Count(t.kills).c_str(),
               Count(fork_spaces).c_str());
  std::fprintf(out_,
               "  faults served: %s (missing %s, minor %s); pages copied %s, zeroed %s, "
               "poisoned %s; %s read from the source\n",
               Count(served.faults()).c_str(), Count(served.faults_missing).c_str(),
               Count(served.faults_minor).c_str(), Count(served.pages_copied).c_str(),
               Count(served.pages_zeroed).c_str(), Count(served.pages_poisoned).c_str(),
               Bytes(served.bytes_read).c_str());
  std::fprintf(out_,
               "  events injected: balloon %s (%s pages, %s storms), munmap %s, fork %s, kill %s, "
               "ioerror %s failed reads (%s cut short)\n",
               Count(t.balloons).c_str(), Count(t.balloon_units).c_str(), Count(t.storms).c_str(),
               Count(t.munmaps).c_str(), Count(t.forks).c_str(), Count(t.kills).c_str(),
               Count(failing_os_ ? failing_os_->failed_reads() : 0).c_str(),
               Count(failing_os_ ? failing_os_->short_reads() : 0).c_str());
  std::fprintf(out_,
               "  events the daemon saw: remove %s, fork %s, unmap %s; eagain retries %s; "
               "slowest fault %.1f ms\n",
               Count(served.events_remove).c_str(), Count(served.events_fork).c_str(),
               Count(served.events_unmap).c_str(), Count(served.eagain_retries).c_str(),
               static_cast<double>(served.latency_max_ns) / 1e6);
  std::fprintf(out_, "  bytes verified: %s (%s pages of 4 KiB)\n", Bytes(t.bytes_verified).c_str(),
               Count(t.bytes_verified / kPageSize4K).c_str());
  std::fprintf(out_,
               "  pages poisoned: %s SIGBUS seen by VMs, all on pages the source cannot read; "
               "%s SIGSEGV on memory just unmapped\n",
               Count(t.sigbus).c_str(), Count(t.sigsegv).c_str());
  if (fds_after_ != 0) {
    const bool leaked = fds_after_ != fds_before_ || spaces_after_ != 0;
    std::fprintf(
        out_, "  leaks: %s (descriptors %d before the first VM, %d after the last; spaces %zu)\n",
        leaked ? "yes" : "none", fds_before_, fds_after_, spaces_after_);
  }
}

SoakSummary Driver::Summary() const {
  SoakSummary s;
  const VmTotals& t = totals_;
  s.vms = t.vms;
  s.huge_vms = t.huge_vms;
  s.kills = t.kills;
  {
    std::lock_guard lock(mu_);
    s.faults = served_.faults();
    s.pages_poisoned = served_.pages_poisoned;
    s.forked_spaces = fork_spaces_closed_;
  }
  s.balloons = t.balloons;
  s.storms = t.storms;
  s.munmaps = t.munmaps;
  s.forks = t.forks;
  s.failed_reads = failing_os_ ? failing_os_->failed_reads() : 0;
  s.bytes_verified = t.bytes_verified;
  s.sigbus = t.sigbus;
  s.sigsegv = t.sigsegv;
  s.failure = failure_.value_or("");
  return s;
}

}  // namespace

Result<uint32_t> ParseInjections(std::string_view list) {
  if (list == "all") return kAllInjections;
  uint32_t mask = 0;
  if (list.empty() || list == "none") return mask;
  size_t start = 0;
  while (true) {
    const size_t comma = list.find(',', start);
    const std::string_view word = list.substr(start, comma - start);
    bool known = false;
    for (const auto& [bit, name] : kInjectionNames) {
      if (word == name) {
        mask |= bit;
        known = true;
      }
    }
    if (!known) {
      return Error(ErrorCode::kInvalidArgument,
                   "unknown injection '" + std::string(word) +
                       "' (choose from balloon, munmap, fork, kill, ioerror; all; none)");
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return mask;
}

std::string InjectionList(uint32_t injections) {
  std::string list;
  for (const auto& [bit, name] : kInjectionNames) {
    if ((injections & bit) == 0) continue;
    if (!list.empty()) list += ",";
    list += name;
  }
  return list.empty() ? "none" : list;
}

int RunSoak(const SoakOptions& options, std::FILE* out, SoakSummary* summary) {
  auto bad = [&](const std::string& why) {
    std::fprintf(out, "gmem soak: %s\n", why.c_str());
    return kSoakCannotRun;
  };
  if (options.memory_mib == 0 || options.memory_mib % 8 != 0 || options.memory_mib > 4096) {
    return bad("--memory-mib must be a multiple of 8 between 8 and 4096");
  }
  if (options.vms == 0 || options.vms > kMaxVms) return bad("--vms must be 1..64");
  if (options.threads == 0 || options.threads > kMaxVmThreads)
    return bad("--threads must be 1..16");
  if (options.max_regions == 0 || options.max_regions > 8) return bad("--regions must be 1..8");
  if (options.operations < 100) return bad("--operations must be at least 100");
  const uint64_t window = options.fault_around_kib << 10;
  if (window < kPageSize4K || (window & (window - 1)) != 0 || window > (uint64_t{1} << 30)) {
    return bad("--fault-around-kib must be a power of two from 4 to 1048576");
  }
  if (options.workers == 0 || options.workers > 16) return bad("--workers must be 1..16");
  if (options.ioerror_permille > 1000) return bad("--ioerror-permille must be 0..1000");
  if (options.hang_seconds <= 0 || options.leak_seconds < 0 || options.seconds < 0) {
    return bad("--hang-seconds must be positive, --seconds and --leak-seconds not negative");
  }
  Driver driver(options, out);
  const int result = driver.Run();
  if (summary != nullptr) *summary = driver.Summary();
  return result;
}

}  // namespace guestmem::soak
