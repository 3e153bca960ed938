#include "bench/restore_bench.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/guest_layout.h"
#include "guestmem/memory_file.h"
#include "guestmem/packed_source.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/working_set.h"
#include "guestmem/zero_map.h"

namespace guestmem::bench {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t NanosSince(Clock::time_point start) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
}

// What a workload write leaves in the first 8 bytes of the page at `offset`.
uint64_t WrittenWord(uint64_t offset) { return (offset * 0x9e3779b97f4a7c15ULL) | 1; }

// Runs `plan` over the guest memory at `base`, one thread per list: a read loads 8 bytes of the
// page, a write stores WrittenWord there. The benchmark measures getting pages in, not using them.
// Returns the time from before the first thread starts until the last one has finished.
uint64_t Touch(std::byte* base, const sim::WorkloadPlan& plan) {
  std::vector<std::thread> threads;
  threads.reserve(plan.threads.size());
  const auto start = Clock::now();
  for (const std::vector<sim::Access>& list : plan.threads) {
    threads.emplace_back([base, &list] {
      for (const sim::Access& access : list) {
        std::byte* page = base + access.offset;
        if (access.write) {
          const uint64_t word = WrittenWord(access.offset);
          std::memcpy(page, &word, sizeof(word));
        } else {
          (void)*reinterpret_cast<volatile const uint64_t*>(page);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return NanosSince(start);
}

// Compares every page the plan touched with the snapshot; a written page must hold WrittenWord in
// its first 8 bytes and the snapshot's bytes in the rest. Returns the pages that differ.
uint64_t Verify(const std::byte* memory, std::span<const std::byte> snapshot,
                const sim::WorkloadPlan& plan, uint64_t* pages_verified) {
  enum : uint8_t { kUntouched, kRead, kWritten };
  std::vector<uint8_t> touched(snapshot.size() / kPageSize4K, kUntouched);
  for (const auto& list : plan.threads) {
    for (const sim::Access& access : list) {
      uint8_t& t = touched[access.offset / kPageSize4K];
      t = std::max<uint8_t>(t, access.write ? kWritten : kRead);
    }
  }
  uint64_t mismatches = 0;
  *pages_verified = 0;
  for (uint64_t page = 0; page < touched.size(); ++page) {
    if (touched[page] == kUntouched) continue;
    ++*pages_verified;
    const uint64_t offset = page * kPageSize4K;
    const std::byte* got = memory + offset;
    const std::byte* want = snapshot.data() + offset;
    size_t from = 0;
    if (touched[page] == kWritten) {
      const uint64_t word = WrittenWord(offset);
      if (std::memcmp(got, &word, sizeof(word)) != 0) {
        ++mismatches;
        continue;
      }
      from = sizeof(word);
    }
    if (std::memcmp(got + from, want + from, kPageSize4K - from) != 0) ++mismatches;
  }
  return mismatches;
}

uint64_t MinorFaultsSoFar() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<uint64_t>(usage.ru_minflt);
}

Result<Mapping> FreshAnonymousMemory(uint64_t size) {
  return Mapping::Anonymous(size, MAP_NORESERVE);
}

Result<GuestLayout> OneRegionAt(const void* base, uint64_t size) {
  return GuestLayout::Create(
      {GuestRegion{GuestPhysAddr(0), size, FileOffset(0),
                   HostVirtAddr(reinterpret_cast<uint64_t>(base)), kPageSize4K}});
}

// Anonymous memory registered MISSING with a new uffd: the destination of a copying handler.
struct UffdMemory {
  Mapping memory;
  Userfaultfd uffd;
};

Result<UffdMemory> FreshUffdMemory(uint64_t size) {
  GM_ASSIGN_OR_RETURN(Mapping memory, FreshAnonymousMemory(size));
  GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Create({}));
  GM_RETURN_IF_ERROR(uffd.Register(HostVirtAddr(memory.address()), size, UffdModes::kMissing));
  return UffdMemory{std::move(memory), std::move(uffd)};
}

// --- contestants -------------------------------------------------------------------------------

Result<RestoreRun> RunFileBackend(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan) {
  GM_ASSIGN_OR_RETURN(Mapping memory, Mapping::Map(snapshot.size(), PROT_READ | PROT_WRITE,
                                                   MAP_PRIVATE, snapshot.fd(), 0));
  RestoreRun run;
  const uint64_t faults_before = MinorFaultsSoFar();
  run.elapsed_ns = Touch(memory.bytes(), plan);
  run.faults = MinorFaultsSoFar() - faults_before;
  run.mismatches = Verify(memory.bytes(), snapshot.view(), plan, &run.pages_verified);
  return run;
}

// Firecracker's example handler, as the reference: one thread; poll; read one event; one 4 KiB
// UFFDIO_COPY from a mapping of the memory file; repeat.
class PerPageHandler {
 public:
  PerPageHandler(Userfaultfd& uffd, uint64_t base, std::span<const std::byte> file)
      : uffd_(uffd), base_(base), file_(file), stop_(eventfd(0, EFD_CLOEXEC)) {}
  ~PerPageHandler() { (void)Stop(); }

  Status Start() {
    if (!stop_.valid()) return PosixError(errno, "per-page handler: eventfd");
    thread_ = std::thread([this] { result_ = Serve(); });
    return OkStatus();
  }
  // Ends the handler thread and returns how it ended.
  Status Stop() {
    if (thread_.joinable()) {
      const uint64_t one = 1;
      (void)!write(stop_.get(), &one, sizeof(one));
      thread_.join();
    }
    return result_;
  }
  uint64_t faults() const { return faults_; }
  uint64_t copies() const { return copies_; }

 private:
  Status Serve() {
    std::vector<UffdEvent> events;
    while (true) {
      pollfd fds[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return PosixError(errno, "per-page handler: poll");
      }
      if (fds[1].revents != 0) return OkStatus();
      events.clear();
      GM_RETURN_IF_ERROR(uffd_.ReadEvents(&events, 1));
      for (const UffdEvent& event : events) {
        const auto* fault = std::get_if<PagefaultEvent>(&event);
        if (fault == nullptr) continue;
        ++faults_;
        const HostVirtAddr page = fault->address.AlignDown(kPageSize4K);
        const uint64_t offset = page.value() - base_;
        GM_ASSIGN_OR_RETURN(UffdProgress done,
                            uffd_.Copy(page, file_.data() + offset, kPageSize4K));
        if (done.outcome == UffdProgress::Outcome::kDone) {
          ++copies_;
        } else {
          GM_RETURN_IF_ERROR(uffd_.Wake(page, kPageSize4K));  // another fault got there first
        }
      }
    }
  }

  Userfaultfd& uffd_;
  const uint64_t base_;
  const std::span<const std::byte> file_;
  UniqueFd stop_;
  std::thread thread_;
  Status result_;
  uint64_t faults_ = 0;  // written by the handler thread, read after Stop()
  uint64_t copies_ = 0;
};

Result<RestoreRun> RunPerPage(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan) {
  GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
  PerPageHandler handler(dest.uffd, dest.memory.address(), snapshot.view());
  GM_RETURN_IF_ERROR(handler.Start());
  RestoreRun run;
  run.elapsed_ns = Touch(dest.memory.bytes(), plan);
  GM_RETURN_IF_ERROR(handler.Stop());
  run.faults = handler.faults();
  run.pages_installed = handler.copies();
  run.mismatches = Verify(dest.memory.bytes(), snapshot.view(), plan, &run.pages_verified);
  return run;
}

// Serves `memory` with a guestmem FaultHandler on a FaultEngine while the plan runs.
// `source`: where content comes from (the snapshot's own source, or its packed form); what the
// memory is verified against is always the snapshot's raw view. `observe`: the trace and the
// callbacks of RestoreOptions (none for an untimed restore).
Result<RestoreRun> RunWithEngine(std::byte* memory, Userfaultfd uffd,
                                 const RestoreSnapshot& snapshot,
                                 std::shared_ptr<const PageSource> source,
                                 const sim::WorkloadPlan& plan, FaultHandlerOptions handler_options,
                                 unsigned workers, const RestoreOptions& observe) {
  GM_ASSIGN_OR_RETURN(GuestLayout layout, OneRegionAt(memory, snapshot.size()));
  const bool fault_all = handler_options.fill == FillMode::kAtFirstFault;
  if (!observe.trace_path.empty()) {
    GM_ASSIGN_OR_RETURN(handler_options.trace,
                        RestoreTraceWriter::Create(observe.trace_path,
                                                   {handler_options.name, getpid(), snapshot.path(),
                                                    snapshot.size() / kPageSize4K, 0}));
  }
  GM_ASSIGN_OR_RETURN(auto handler,
                      FaultHandler::Create(std::move(uffd), std::move(layout), std::move(source),
                                           std::move(handler_options)));
  GM_ASSIGN_OR_RETURN(auto engine, FaultEngine::Start({.workers = workers}));
  GM_ASSIGN_OR_RETURN(SpaceId space, engine->AddSpace(std::move(handler)));
  if (observe.on_serving) observe.on_serving(*engine, space);
  RestoreRun run;
  run.elapsed_ns = Touch(memory, plan);
  if (fault_all) {
    // Let the install of everything finish before the space goes, so that it is measured whole.
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (engine->Stats(space).value_or(FaultStats{}).fault_all_us == 0 &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  GM_ASSIGN_OR_RETURN(FaultStats stats, engine->RemoveSpace(space));
  if (observe.on_served) observe.on_served(space, stats);
  run.faults = stats.faults();
  run.pages_installed = stats.pages_installed();
  run.fault_all_ns = stats.fault_all_us * 1000;
  run.latency_p50_ns = stats.latency_p50_ns;
  run.pages_prefetched = stats.pages_prefetched;
  run.mismatches = Verify(memory, snapshot.view(), plan, &run.pages_verified);
  return run;
}

Result<RestoreRun> RunCopyingEngine(const RestoreSnapshot& snapshot,
                                    std::shared_ptr<const PageSource> source,
                                    const sim::WorkloadPlan& plan, const RestoreOptions& options,
                                    bool fault_all) {
  GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
  FaultHandlerOptions handler_options;
  handler_options.name = fault_all ? "bench fault-all" : "bench on-demand";
  handler_options.fault_around_bytes = options.fault_around_bytes;
  handler_options.adaptive_windows = options.adaptive_windows;
  handler_options.fill = fault_all ? FillMode::kAtFirstFault : FillMode::kNone;
  return RunWithEngine(dest.memory.bytes(), std::move(dest.uffd), snapshot, std::move(source),
                       plan, std::move(handler_options), options.workers, options);
}

// The second restore of the snapshot: a first one (untimed, a workload 5% different) is recorded
// and learned from, then `plan` runs with what was learned prefetched from the start.
// `packed`: both restores from the packed snapshot, the timed one from a fresh source.
Result<RestoreRun> RunLearned(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan,
                              const RestoreOptions& options, bool packed) {
  auto source_for_run = [&]() -> Result<std::shared_ptr<const PageSource>> {
    if (packed) return snapshot.OpenPacked();
    return snapshot.source();
  };
  const sim::WorkloadPlan first =
      PerturbPlan(plan, snapshot.size() / kPageSize4K, kLearnedDifference, /*seed=*/0x5eed);
  auto recorder = std::make_shared<WorkingSetRecorder>();
  {
    GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
    FaultHandlerOptions handler_options;
    handler_options.name = "bench first restore";
    handler_options.fault_around_bytes = options.fault_around_bytes;
    handler_options.adaptive_windows = options.adaptive_windows;
    handler_options.recorder = recorder;
    GM_ASSIGN_OR_RETURN(std::shared_ptr<const PageSource> source, source_for_run());
    GM_ASSIGN_OR_RETURN(RestoreRun learning,
                        RunWithEngine(dest.memory.bytes(), std::move(dest.uffd), snapshot,
                                      std::move(source), first, std::move(handler_options),
                                      options.workers, {}));
    if (learning.mismatches != 0) {
      return Error(ErrorCode::kDataLoss, "bench: the learning restore read wrong bytes");
    }
  }
  if (options.cold) GM_RETURN_IF_ERROR(snapshot.Evict());
  GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
  FaultHandlerOptions handler_options;
  handler_options.name = "bench learned";
  handler_options.fault_around_bytes = options.fault_around_bytes;
  handler_options.adaptive_windows = options.adaptive_windows;
  handler_options.prefetch =
      std::make_shared<const WorkingSet>(WorkingSet::Merge(WorkingSet(), recorder->Take()));
  GM_ASSIGN_OR_RETURN(std::shared_ptr<const PageSource> source, source_for_run());
  return RunWithEngine(dest.memory.bytes(), std::move(dest.uffd), snapshot, std::move(source),
                       plan, std::move(handler_options), options.workers, options);
}

Result<RestoreRun> RunMinorTrap(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan,
                                const RestoreOptions& options) {
  GM_ASSIGN_OR_RETURN(auto file, MemoryFile::Create({.size_bytes = snapshot.size(),
                                                     .backend = MemoryBackend::kShmem,
                                                     .name = "guestmem-bench"}));
  GM_ASSIGN_OR_RETURN(MemoryMapping mapping, file->Map());
  GM_ASSIGN_OR_RETURN(Userfaultfd uffd,
                      Userfaultfd::Create({.required_features =
                                               kUffdFeatureMissingShmem | kUffdFeatureMinorShmem}));
  GM_RETURN_IF_ERROR(uffd.Register(mapping.host_address(), snapshot.size(),
                                   UffdModes::kMissing | UffdModes::kMinor));
  FaultHandlerOptions handler_options;
  handler_options.name = "bench minor-trap";
  handler_options.mode = InstallMode::kMinorTrap;
  handler_options.fault_around_bytes = options.fault_around_bytes;
  handler_options.adaptive_windows = options.adaptive_windows;
  handler_options.memory_file = file;
  return RunWithEngine(mapping.bytes(), std::move(uffd), snapshot, snapshot.source(), plan,
                       std::move(handler_options), options.workers, options);
}

// The floor: the touched pages installed in bulk, no handler, then the workload without faults.
struct FloorRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;
};

// The touched pages, sorted, cut into `slices` contiguous slices of (nearly) equal page counts,
// each as runs of neighbouring pages of one kind.
std::vector<std::vector<FloorRun>> PlanFloor(const RestoreSnapshot& snapshot,
                                             const sim::WorkloadPlan& plan, size_t slices) {
  std::vector<bool> touched(snapshot.size() / kPageSize4K, false);
  for (const auto& list : plan.threads) {
    for (const sim::Access& access : list) touched[access.offset / kPageSize4K] = true;
  }
  std::vector<uint64_t> pages;
  for (uint64_t p = 0; p < touched.size(); ++p) {
    if (touched[p]) pages.push_back(p);
  }
  std::vector<std::vector<FloorRun>> out(std::max<size_t>(slices, 1));
  for (size_t s = 0; s < out.size(); ++s) {
    const size_t begin = pages.size() * s / out.size();
    const size_t end = pages.size() * (s + 1) / out.size();
    for (size_t i = begin; i < end; ++i) {
      const uint64_t p = pages[i];
      const bool zero = snapshot.zero_page(p);
      std::vector<FloorRun>& runs = out[s];
      if (!runs.empty() && runs.back().zero == zero &&
          runs.back().offset + runs.back().length == p * kPageSize4K) {
        runs.back().length += kPageSize4K;
      } else {
        runs.push_back({p * kPageSize4K, kPageSize4K, zero});
      }
    }
  }
  return out;
}

Result<RestoreRun> RunFloor(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan) {
  GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
  const auto slices = PlanFloor(snapshot, plan, plan.threads.size());
  std::atomic<uint64_t> installed{0};
  std::atomic<bool> failed{false};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (const std::vector<FloorRun>& runs : slices) {
    threads.emplace_back([&] {
      for (const FloorRun& run : runs) {
        const HostVirtAddr at(dest.memory.address() + run.offset);
        auto done = run.zero ? dest.uffd.ZeroPage(at, run.length)
                             : dest.uffd.Copy(at, snapshot.view().data() + run.offset, run.length);
        if (!done || done->outcome != UffdProgress::Outcome::kDone) failed.store(true);
        installed.fetch_add(run.length / kPageSize4K, std::memory_order_relaxed);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const uint64_t install_ns = NanosSince(start);
  if (failed.load()) return Error(ErrorCode::kInternal, "bench floor: an install failed");
  RestoreRun run;
  run.elapsed_ns = install_ns + Touch(dest.memory.bytes(), plan);
  run.pages_installed = installed.load();
  run.mismatches = Verify(dest.memory.bytes(), snapshot.view(), plan, &run.pages_verified);
  return run;
}

}  // namespace

std::string_view ContestantName(Contestant contestant) {
  switch (contestant) {
    case Contestant::kFileBackend:
      return "file";
    case Contestant::kPerPage:
      return "per-page";
    case Contestant::kOnDemand:
      return "on-demand";
    case Contestant::kLearned:
      return "learned";
    case Contestant::kFaultAll:
      return "fault-all";
    case Contestant::kMinorTrap:
      return "minor-trap";
    case Contestant::kPacked:
      return "packed";
    case Contestant::kPackedShared:
      return "packed-shared";
    case Contestant::kPackedLearned:
      return "packed-learned";
    case Contestant::kFloor:
      return "floor";
  }
  return "?";
}

std::string_view ContestantTitle(Contestant contestant) {
  switch (contestant) {
    case Contestant::kFileBackend:
      return "File backend (MAP_PRIVATE)";
    case Contestant::kPerPage:
      return "per-page handler (reference)";
    case Contestant::kOnDemand:
      return "guestmem on-demand";
    case Contestant::kLearned:
      return "guestmem learned (2nd restore)";
    case Contestant::kFaultAll:
      return "guestmem fault-all";
    case Contestant::kMinorTrap:
      return "guestmem minor trap (shmem)";
    case Contestant::kPacked:
      return "guestmem on-demand, packed";
    case Contestant::kPackedShared:
      return "guestmem packed, shared cache";
    case Contestant::kPackedLearned:
      return "guestmem learned, packed";
    case Contestant::kFloor:
      return "floor (bulk install, no faults)";
  }
  return "?";
}

Result<Contestant> ParseContestant(std::string_view name) {
  for (Contestant c : kAllContestants) {
    if (ContestantName(c) == name) return c;
  }
  return Error(ErrorCode::kInvalidArgument,
               "unknown contestant \"" + std::string(name) +
                   "\" (file, per-page, on-demand, learned, fault-all, minor-trap, packed, "
                   "packed-shared, packed-learned, floor)");
}

Result<RestoreSnapshot> RestoreSnapshot::Open(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return PosixError(errno, "bench: open " + path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return PosixError(errno, "bench: fstat " + path);
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size == 0 || size % kPageSize4K != 0) {
    return Error(ErrorCode::kInvalidArgument,
                 "bench: " + path + " is not a non-empty multiple of 4 KiB");
  }
  // MAP_POPULATE reads the file through once: page cache hot for every contestant.
  GM_ASSIGN_OR_RETURN(Mapping view,
                      Mapping::Map(size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd.get(), 0));
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> source, RawFileSource::Open(path));
  // What gmem serve knows of a snapshot it has seen before: its zero pages, by content.
  GM_ASSIGN_OR_RETURN(std::shared_ptr<const ZeroMap> zero_map, ZeroMap::Scan(*source));
  source->SetZeroMap(std::move(zero_map));
  std::vector<bool> zero_pages(size / kPageSize4K);
  static constexpr std::byte kZeros[kPageSize4K] = {};
  for (uint64_t p = 0; p < zero_pages.size(); ++p) {
    zero_pages[p] = std::memcmp(view.bytes() + p * kPageSize4K, kZeros, kPageSize4K) == 0;
  }
  return RestoreSnapshot(path, std::move(fd), std::move(view), std::move(source),
                         std::move(zero_pages));
}

Status RestoreSnapshot::Evict() const {
  // Pages this view maps cannot leave the page cache: drop the view's mappings first (it is a
  // private read-only mapping: nothing is lost; the next read maps them again).
  if (madvise(view_.data(), view_.size(), MADV_DONTNEED) != 0) {
    return PosixError(errno, "bench: madvise(DONTNEED) of the snapshot view");
  }
  // Dirty pages (a snapshot just written) stay in the cache until they are on the disk.
  if (fdatasync(fd_.get()) != 0) return PosixError(errno, "bench: fdatasync " + path_);
  if (const int rc = posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED); rc != 0) {
    return PosixError(rc, "bench: posix_fadvise(DONTNEED) " + path_);
  }
  if (!packed_path_.empty()) {
    UniqueFd packed(open(packed_path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (!packed) return PosixError(errno, "bench: open " + packed_path_);
    if (fdatasync(packed.get()) != 0) return PosixError(errno, "bench: fdatasync " + packed_path_);
    if (const int rc = posix_fadvise(packed.get(), 0, 0, POSIX_FADV_DONTNEED); rc != 0) {
      return PosixError(rc, "bench: posix_fadvise(DONTNEED) " + packed_path_);
    }
  }
  return OkStatus();
}

Result<PackSummary> RestoreSnapshot::MakePacked(const std::string& packed_path,
                                                const PackOptions& options) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> raw, RawFileSource::Open(path_));
  GM_ASSIGN_OR_RETURN(PackSummary summary, PackSnapshot(*raw, packed_path, options));
  packed_path_ = packed_path;
  GM_ASSIGN_OR_RETURN(shared_packed_, OpenPacked());
  // Read once through, as the memory file was: hot for every run that does not evict it.
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> packed, RawFileSource::Open(packed_path));
  std::vector<std::byte> buffer(uint64_t{4} << 20);
  for (uint64_t at = 0; at < packed->size(); at += buffer.size()) {
    const uint64_t n = std::min<uint64_t>(buffer.size(), packed->size() - at);
    GM_RETURN_IF_ERROR(packed->ReadAt(FileOffset(at), std::span(buffer).first(n)));
  }
  return summary;
}

Result<std::shared_ptr<const PageSource>> RestoreSnapshot::OpenPacked() const {
  if (packed_path_.empty()) {
    return Error(ErrorCode::kFailedPrecondition, "bench: no packed snapshot was made");
  }
  GM_ASSIGN_OR_RETURN(std::unique_ptr<PackedSource> packed, PackedSource::Open(packed_path_));
  return std::shared_ptr<const PageSource>(std::move(packed));
}

Result<ManyVmsRun> RunManyVms(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan,
                              unsigned vms, const RestoreOptions& options) {
  if (vms == 0) return Error(ErrorCode::kInvalidArgument, "bench: no VMs");
  if (options.cold) GM_RETURN_IF_ERROR(snapshot.Evict());
  GM_ASSIGN_OR_RETURN(auto engine, FaultEngine::Start({.workers = options.workers}));
  std::vector<UffdMemory> memories;
  std::vector<SpaceId> spaces;
  for (unsigned i = 0; i < vms; ++i) {
    GM_ASSIGN_OR_RETURN(UffdMemory dest, FreshUffdMemory(snapshot.size()));
    GM_ASSIGN_OR_RETURN(GuestLayout layout, OneRegionAt(dest.memory.bytes(), snapshot.size()));
    FaultHandlerOptions handler_options;
    handler_options.name = "bench vm " + std::to_string(i);
    handler_options.fault_around_bytes = options.fault_around_bytes;
    handler_options.adaptive_windows = options.adaptive_windows;
    GM_ASSIGN_OR_RETURN(auto handler,
                        FaultHandler::Create(std::move(dest.uffd), std::move(layout),
                                             snapshot.source(), std::move(handler_options)));
    GM_ASSIGN_OR_RETURN(SpaceId space, engine->AddSpace(std::move(handler)));
    spaces.push_back(space);
    memories.push_back(std::move(dest));
  }
  std::vector<uint64_t> vm_ns(vms);
  std::vector<std::thread> guests;
  const auto start = Clock::now();
  for (unsigned i = 0; i < vms; ++i) {
    guests.emplace_back([&, i] { vm_ns[i] = Touch(memories[i].memory.bytes(), plan); });
  }
  for (std::thread& guest : guests) guest.join();
  ManyVmsRun run;
  run.total_ns = NanosSince(start);
  std::vector<uint64_t> sorted = vm_ns;
  std::sort(sorted.begin(), sorted.end());
  run.median_vm_ns = sorted[sorted.size() / 2];
  for (unsigned i = 0; i < vms; ++i) {
    GM_ASSIGN_OR_RETURN(FaultStats stats, engine->RemoveSpace(spaces[i]));
    run.faults += stats.faults();
    uint64_t verified = 0;
    run.mismatches += Verify(memories[i].memory.bytes(), snapshot.view(), plan, &verified);
    run.pages_verified += verified;
  }
  return run;
}

sim::WorkloadPlan PerturbPlan(const sim::WorkloadPlan& plan, uint64_t snapshot_pages, double share,
                              uint64_t seed) {
  std::unordered_set<uint64_t> touched;
  for (const auto& list : plan.threads) {
    for (const sim::Access& a : list) touched.insert(a.offset / kPageSize4K);
  }
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> coin(0, 1);
  std::uniform_int_distribution<uint64_t> any_page(0, snapshot_pages - 1);
  std::unordered_map<uint64_t, uint64_t> swapped;  // page -> its stand-in (itself: kept)
  sim::WorkloadPlan out = plan;
  for (auto& list : out.threads) {
    for (sim::Access& a : list) {
      const uint64_t page = a.offset / kPageSize4K;
      auto [it, fresh] = swapped.try_emplace(page, page);
      if (fresh && coin(rng) < share && touched.size() < snapshot_pages) {
        uint64_t other = any_page(rng);
        while (touched.count(other) != 0) other = any_page(rng);
        touched.insert(other);
        it->second = other;
      }
      a.offset = it->second * kPageSize4K + a.offset % kPageSize4K;
    }
  }
  return out;
}

Result<RestoreRun> RunRestore(Contestant contestant, const RestoreSnapshot& snapshot,
                              const sim::WorkloadPlan& plan, const RestoreOptions& options) {
  // The learned contestant's first restore is not timed: it evicts before its timed one.
  if (options.cold && contestant != Contestant::kLearned &&
      contestant != Contestant::kPackedLearned) {
    GM_RETURN_IF_ERROR(snapshot.Evict());
  }
  switch (contestant) {
    case Contestant::kFileBackend:
      return RunFileBackend(snapshot, plan);
    case Contestant::kPerPage:
      return RunPerPage(snapshot, plan);
    case Contestant::kOnDemand:
      return RunCopyingEngine(snapshot, snapshot.source(), plan, options, false);
    case Contestant::kLearned:
      return RunLearned(snapshot, plan, options, /*packed=*/false);
    case Contestant::kFaultAll:
      return RunCopyingEngine(snapshot, snapshot.source(), plan, options, true);
    case Contestant::kPacked: {
      GM_ASSIGN_OR_RETURN(std::shared_ptr<const PageSource> packed, snapshot.OpenPacked());
      return RunCopyingEngine(snapshot, std::move(packed), plan, options, false);
    }
    case Contestant::kPackedShared:
      return RunCopyingEngine(snapshot, snapshot.shared_packed(), plan, options, false);
    case Contestant::kPackedLearned:
      return RunLearned(snapshot, plan, options, /*packed=*/true);
    case Contestant::kMinorTrap:
      return RunMinorTrap(snapshot, plan, options);
    case Contestant::kFloor:
      return RunFloor(snapshot, plan);
  }
  return Error(ErrorCode::kInvalidArgument, "bench: unknown contestant");
}

double MeasureMemcpyBandwidth(const RestoreSnapshot& snapshot) {
  auto dest = FreshAnonymousMemory(snapshot.size());
  if (!dest) return 0;
  std::memset(dest->data(), 1, snapshot.size());  // touched: no faults in the timed copies
  uint64_t best_ns = UINT64_MAX;
  for (int i = 0; i < 3; ++i) {
    const auto start = Clock::now();
    std::memcpy(dest->data(), snapshot.view().data(), snapshot.size());
    best_ns = std::min(best_ns, NanosSince(start));
  }
  return static_cast<double>(snapshot.size()) * 1e9 / static_cast<double>(best_ns);
}

}  // namespace guestmem::bench
