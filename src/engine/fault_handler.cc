#include "guestmem/fault_handler.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <variant>

#include "base/hex.h"
#include "engine/latency_histogram.h"
#include "engine/token_bucket.h"
#include "guestmem/content_fetcher.h"
#include "guestmem/event_sequencer.h"
#include "guestmem/install_policy.h"
#include "guestmem/log.h"
#include "guestmem/mapping.h"
#include "guestmem/page_installer.h"
#include "guestmem/page_tracker.h"

namespace guestmem {
namespace {

using Clock = std::chrono::steady_clock;

// A fill installs in chunks this large: big enough that ioctl overhead vanishes, small enough
// that a fault is not kept waiting long.
constexpr uint64_t kFillChunk = uint64_t{4} << 20;
// A background fill's bursts: at most this fraction of a second of its rate (20 ms)...
constexpr uint64_t kFillBurstsPerSecond = 50;
// ... but at least one 2 MiB page, which is installed whole.
constexpr uint64_t kMinFillBurst = kHugePageSize2M;
// The prefetch installs at most this many working-set pages per turn, sorted so that neighbours
// make one install: few enough that a fault arriving meanwhile waits no longer than a fault
// window takes, since the guest's faults are what the prefetch is racing to get ahead of.
constexpr size_t kPrefetchBatchPages = 128;
// How long a retry after EAGAIN waits for the announced event to become readable.
constexpr std::chrono::milliseconds kEventWait{1};

// What one install step asks of its caller.
enum class Step {
  kDone,
  kRetryAfterDrain,  // EAGAIN: read pending events, apply them, then try again
  kWaitForContent,   // the source is bringing the content in; the turn ends until it says so
};

uint64_t NowNanos() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
          .count());
}

uint64_t NanosBetween(Clock::time_point start, Clock::time_point end) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count());
}

uint64_t NanosSince(Clock::time_point start) { return NanosBetween(start, Clock::now()); }

uint64_t PageIndex(uint64_t file_offset) { return file_offset / kPageSize4K; }

// 1, 10, 100, ...: how often a repeated complaint is logged.
bool IsPowerOfTen(uint64_t n) {
  while (n >= 10 && n % 10 == 0) n /= 10;
  return n == 1;
}

struct Counters {
  std::atomic<uint64_t> faults_missing{0}, faults_minor{0}, faults_write_protect{0};
  std::atomic<uint64_t> faults_stray{0}, faults_guest{0}, pages_prefetched{0}, pages_filled{0};
  std::atomic<uint64_t> events_remove{0}, events_unmap{0}, events_remap{0}, events_fork{0};
  std::atomic<uint64_t> pages_poisoned{0}, eagain_retries{0}, fault_all_us{0}, content_waits{0};
  std::atomic<uint64_t> first_fault_served_ns{0}, fill_finished_ns{0}, turns{0};
  std::atomic<uint64_t> prefetch_hits{0}, prefetch_misses{0};
};

void Add(std::atomic<uint64_t>& counter, uint64_t n) {
  counter.fetch_add(n, std::memory_order_relaxed);
}

uint64_t Get(const std::atomic<uint64_t>& counter) {
  return counter.load(std::memory_order_relaxed);
}

Error TaskGone(const std::string& name) {
  return Error(ErrorCode::kPeerGone, name + ": the VM's process has exited");
}

}  // namespace

// The parts of one VM's fault pipeline and the order in which a turn drives them.
class FaultHandler::Pipeline {
 public:
  Pipeline(Userfaultfd u, GuestLayout l, FaultHandlerOptions o, std::unique_ptr<ContentFetcher> f,
           Mapping z)
      : uffd(std::move(u)),
        layout(std::move(l)),
        options(std::move(o)),
        tracker_owner(options.tracker != nullptr
                          ? options.tracker
                          : std::make_shared<PageTracker>(PageIndex(layout.file_end()))),
        tracker(*tracker_owner),
        sequencer(&uffd),
        fault_around(options.fault_around_bytes),
        adaptive(options.fault_around_bytes, std::min(kMaxStreamBytes, f->capacity())),
        fetcher(std::move(f)),
        zeros(std::move(z)) {
    if (options.mode == InstallMode::kCopy) {
      installer = std::make_unique<CopyInstaller>(&uffd, &zeros);
    } else {
      auto minor = std::make_unique<MinorTrapInstaller>(&uffd, options.memory_file.get(), &zeros);
      minor_trap = minor.get();
      installer = std::move(minor);
    }
  }

  Result<bool> Serve(const ServeBudget& budget);
  Result<bool> FillStep(const ServeBudget& budget);
  // One budget of the prefetch; returns whether any of it is left.
  Result<bool> PrefetchStep(const ServeBudget& budget);
  // Serves the guest faults posted so far (at most `budget`); returns whether more wait.
  bool ServeGuestFaults(size_t budget);
  // Starts a fill of `mode` (kAtFirstFault: at full speed), unless one has started already.
  void StartFill(FillMode mode);
  void FinishFill();
  // A working set given since the last turn (given_prefetch) replaces the prefetch's pages. Pages
  // no region holds are passed over by the prefetch (the recorder counts them as reached).
  void TakeGivenPrefetch();
  // A background fill asked for since the last turn (given_fill) is due once the prefetch is in.
  void TakeGivenFill();
  // Tells the source which of the prefetch's pages hold data, in sorted runs, so that a cold
  // snapshot is read in ahead of the prefetch in few large I/Os instead of page by page.
  void AdvisePrefetch() const;
  FaultStats Stats() const;
  // The window to install for a fault on `page_offset` of region `region`.
  RegionRange WindowForFault(size_t region, uint64_t page_offset);

  Userfaultfd uffd;
  GuestLayout layout;
  FaultHandlerOptions options;
  std::shared_ptr<PageTracker> tracker_owner;
  PageTracker& tracker;
  EventSequencer sequencer;
  FaultAroundPolicy fault_around;
  AdaptiveWindowPolicy adaptive;
  std::optional<FillCursor> fill;        // from a fill's start until every page is in
  FillMode filling = FillMode::kNone;    // which fill started
  std::optional<TokenBucket> fill_rate;  // a background fill's; none: full speed
  bool background_fill_due = false;      // once the prefetch is in
  // Set by a turn whose work left is due only later (Serve() returned false).
  std::optional<Clock::time_point> wake_at;
  bool fill_started = false;
  Clock::time_point fill_start;
  std::unique_ptr<ContentFetcher> fetcher;
  Mapping zeros;
  std::unique_ptr<PageInstaller> installer;
  MinorTrapInstaller* minor_trap = nullptr;  // the installer, in the minor trap
  Counters counters;
  // Guest faults posted from other threads, served at the start of a turn.
  std::mutex guest_mu;
  std::vector<std::pair<GuestFault, GuestFaultDone>> guest_faults;  // GUARDED_BY(guest_mu)
  // A working set to start prefetching (options.prefetch, or StartPrefetch's).
  std::shared_ptr<const WorkingSet> given_prefetch;  // GUARDED_BY(guest_mu)
  bool given_fill = false;                           // GUARDED_BY(guest_mu)
  UniqueFd work_event;  // eventfd: work waits that the uffd does not announce
  // Told by the source when content it was bringing in is there (writes work_event through a
  // descriptor of its own, so that a source that outlives the handler writes to nothing harmful).
  std::function<void()> content_ready;
  // The content the last install waited for: when its turn comes again it is read even if the
  // source would have it waited for once more (evicted meanwhile), so that a wait ends.
  std::optional<FileOffset> waited_for;
  // The prefetch: working-set pages in order, and how far it got.
  std::vector<uint64_t> prefetch_pages;
  size_t prefetch_next = 0;
  Clock::time_point prefetch_start;
  LatencyHistogram latency;
  // A uffd fault's service in parts: queued (read to first served), fetching, installing.
  BucketHistogram queue_latency, fetch_latency, install_latency;
  std::vector<std::unique_ptr<FaultHandler>> children;

 private:
  Status ReadEvents(bool after_again);
  Status ApplyChanges();
  void ApplyRemove(HostVirtAddr start, HostVirtAddr end);
  void ApplyUnmap(HostVirtAddr start, HostVirtAddr end);
  Status ApplyRemap(const RemapEvent& remap);
  Status ApplyFork(ForkEvent& fork);
  template <typename Fn>
  void ForEachOverlap(HostVirtAddr start, HostVirtAddr end, Fn fn);

  Result<Step> ServeFault(const PagefaultEvent& fault);
  // Puts the page of a guest fault (and its window) into the guest memory file; clears bits.
  Status ServeGuestFault(const GuestFault& fault);
  // The userfault bits of [offset, offset + length) of `region`, whose content is in the file.
  void ClearUserfaultBits(const GuestRegion& region, uint64_t offset, uint64_t length) {
    if (options.userfault_bitmap == nullptr) return;
    const uint64_t first = PageIndex(region.file_offset.value() + offset);
    const uint64_t count = length / kPageSize4K;
    if (first + count <= options.userfault_bitmap->page_count()) {
      options.userfault_bitmap->Clear(first, count);
    }
  }
  Result<Step> ServeStray(const PagefaultEvent& fault);
  // The pages of `run` still pending, which the prefetch is about to install.
  void NotePrefetched(const RegionRange& run) {
    const GuestRegion& region = layout.regions()[run.region];
    for (uint64_t offset = run.begin; offset < run.end; offset += kPageSize4K) {
      const uint64_t page = PageIndex(region.file_offset.value() + offset);
      if (page < prefetched_.size() && FateOf(region, offset) == PageFate::kPending) {
        prefetched_[page] = true;
      }
    }
  }
  // A fault while a working set is (or was) prefetched: a hit when the prefetch had served its
  // page already, a miss when the fault must install it.
  void CountPrefetchOutcome(const GuestRegion& region, uint64_t page_offset) {
    const uint64_t page = PageIndex(region.file_offset.value() + page_offset);
    const PageFate fate = FateOf(region, page_offset);
    if (fate == PageFate::kServed && page < prefetched_.size() && prefetched_[page]) {
      Add(counters.prefetch_hits, 1);
    } else if (fate == PageFate::kPending) {
      Add(counters.prefetch_misses, 1);
    }
  }
  // `record`: what it installs was needed by a fault (told to options.recorder).
  Result<Step> InstallRange(const RegionRange& range, std::optional<uint64_t> fault_page,
                            bool write_fault, bool record = false);
  Result<Step> InstallContent(const GuestRegion& region, const InstallPiece& piece,
                              std::optional<uint64_t> fault_page, bool record);
  Result<Step> Poison(const GuestRegion& region, uint64_t page_offset, const Error& why);
  void SetFate(const GuestRegion& region, uint64_t offset, uint64_t length, PageFate fate) {
    tracker.Set(PageIndex(region.file_offset.value() + offset), length / kPageSize4K, fate);
  }
  // Pages the installer has put in so far, every way.
  uint64_t PagesInstalled() const {
    const InstallCounters& c = installer->counters();
    return Get(c.copied) + Get(c.zeroed) + Get(c.continued) + Get(c.populated);
  }
  PageFate FateOf(const GuestRegion& region, uint64_t offset) const {
    return tracker.Fate(PageIndex(region.file_offset.value() + offset));
  }
  bool ServedThisTurn(size_t region, uint64_t page_offset) const {
    return std::any_of(served_this_turn_.begin(), served_this_turn_.end(), [&](const auto& r) {
      return r.region == region && page_offset >= r.begin && page_offset < r.end;
    });
  }
  std::string Where(const GuestRegion& region, uint64_t offset) const {
    return options.name + ": page at " + Hex(region.host_addr.value() + offset) + " (offset " +
           Hex(region.file_offset.value() + offset) + ")";
  }

  std::vector<UffdEvent> changes_;
  std::vector<InstallPiece> pieces_;
  // Windows installed this turn. Threads that fault on the same page before it is installed
  // each queue an event; the install woke them all, so the later events need only a wake.
  std::vector<RegionRange> served_this_turn_;
  bool last_read_full_ = false;
  // The fault being served: when its service started (it may be retried after EAGAIN), and the
  // time spent fetching and installing for it so far. Every install adds to the two; a fault's
  // start resets them.
  std::optional<Clock::time_point> fault_started_;
  uint64_t fetch_ns_ = 0;
  uint64_t install_ns_ = 0;
  // Pages (4 KiB, by file page) that the prefetch installed: a later fault on one of them that
  // finds it served is a prefetch hit. Sized when a working set is taken up.
  std::vector<bool> prefetched_;
  // Why what is installed now is installed, for the trace.
  TraceRecordType install_cause_ = TraceRecordType::kFaultInstall;
  void TraceInstall(const GuestRegion& region, uint64_t offset, uint64_t bytes, ContentKind kind,
                    bool populate = false) {
    if (options.trace == nullptr || bytes == 0) return;
    TraceWay way = kind == ContentKind::kZero                ? TraceWay::kZero
                   : options.mode == InstallMode::kMinorTrap ? TraceWay::kContinue
                                                             : TraceWay::kCopy;
    if (populate) way = TraceWay::kPopulate;
    options.trace->Append({.time_ns = options.trace->Now(),
                           .page = PageIndex(region.file_offset.value() + offset),
                           .value = static_cast<uint32_t>(bytes / kPageSize4K),
                           .type = install_cause_,
                           .way = way});
  }
  void TraceFault(HostVirtAddr address, uint64_t latency_ns) {
    if (options.trace == nullptr) return;
    auto hit = layout.FindHost(address);
    if (!hit) return;
    const GuestRegion& region = layout.regions()[hit->region];
    options.trace->Append(
        {.time_ns = options.trace->Now(),
         .page =
             PageIndex(region.file_offset.value() + AlignDown(hit->offset_in_region, kPageSize4K)),
         .value = static_cast<uint32_t>(std::min<uint64_t>(latency_ns, UINT32_MAX)),
         .type = TraceRecordType::kFault});
  }
};

// ---------------------------------------------------------------------------------------------
// Creation

Result<std::unique_ptr<FaultHandler>> FaultHandler::Create(Userfaultfd uffd, GuestLayout layout,
                                                           std::shared_ptr<const PageSource> source,
                                                           FaultHandlerOptions options) {
  if (source == nullptr) return Error(ErrorCode::kInvalidArgument, "fault handler: no source");
  const uint64_t window = options.fault_around_bytes;
  if (window < kMinFaultAroundBytes || !IsPowerOfTwo(window) || window > kMaxFaultAroundBytes) {
    return Error(ErrorCode::kInvalidArgument, "fault handler: fault-around window " +
                                                  std::to_string(window) +
                                                  " is not a power of two between 4096 and 1 GiB");
  }
  if (options.fill_bytes_per_second == 0) {
    return Error(ErrorCode::kInvalidArgument, "fault handler: a fill rate of 0 bytes a second");
  }
  if (layout.file_end() > source->size()) {
    return Error(ErrorCode::kOutOfRange, "fault handler: regions end at offset " +
                                             Hex(layout.file_end()) + " but " + source->Describe() +
                                             " has only " + Hex(source->size()) + " bytes");
  }
  if (options.mode == InstallMode::kMinorTrap) {
    if (options.memory_file == nullptr) {
      return Error(ErrorCode::kInvalidArgument,
                   "fault handler: the minor trap needs the guest memory file");
    }
    if (options.memory_file->size_bytes() < layout.file_end()) {
      return Error(ErrorCode::kOutOfRange, "fault handler: regions end at offset " +
                                               Hex(layout.file_end()) +
                                               " beyond the guest memory file's " +
                                               Hex(options.memory_file->size_bytes()) + " bytes");
    }
    for (const GuestRegion& region : layout.regions()) {
      if (region.page_size != options.memory_file->page_size()) {
        return Error(ErrorCode::kInvalidArgument,
                     "fault handler: region page size " + std::to_string(region.page_size) +
                         " differs from the guest memory file's " +
                         std::to_string(options.memory_file->page_size()));
      }
    }
  }
  if (options.tracker != nullptr && options.tracker->page_count() < PageIndex(layout.file_end())) {
    return Error(ErrorCode::kInvalidArgument, "fault handler: the page tracker holds " +
                                                  std::to_string(options.tracker->page_count()) +
                                                  " pages; the regions need " +
                                                  std::to_string(PageIndex(layout.file_end())));
  }
  if (options.resume) {
    // Faults the previous handler read died with it: their threads wait for a wake that would
    // never come. Woken, each retries its access and faults again if its page is still missing.
    for (const GuestRegion& region : layout.regions()) {
      GM_RETURN_IF_ERROR(uffd.Wake(region.host_addr, region.size));
    }
  }
  uint64_t staging = std::max(window, kHugePageSize2M);
  if (options.adaptive_windows) staging = std::max(staging, kMaxStreamBytes);
  if (options.fill != FillMode::kNone) staging = std::max(staging, kFillChunk);
  // Views of the source are for the kernel to copy from: fine for UFFDIO_COPY and for pwrite into
  // the guest memory file, not for a file written through a mapping (hugetlbfs), where the copy
  // would be the daemon's own.
  const bool use_views =
      options.mode == InstallMode::kCopy || options.memory_file->capabilities().populate_by_write;
  GM_ASSIGN_OR_RETURN(auto fetcher, ContentFetcher::Create(std::move(source), staging, use_views));
  GM_ASSIGN_OR_RETURN(Mapping zeros, MapZeros(staging));
  UniqueFd work_event(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!work_event) return PosixError(errno, "fault handler: eventfd");
  if (options.userfault_bitmap != nullptr &&
      options.userfault_bitmap->page_count() < PageIndex(layout.file_end())) {
    return Error(ErrorCode::kInvalidArgument,
                 "fault handler: the userfault bitmap covers " +
                     std::to_string(options.userfault_bitmap->page_count()) +
                     " pages; the regions need " + std::to_string(PageIndex(layout.file_end())));
  }
  auto pipeline = std::make_unique<Pipeline>(std::move(uffd), std::move(layout), std::move(options),
                                             std::move(fetcher), std::move(zeros));
  auto ready_fd = std::make_shared<UniqueFd>(fcntl(work_event.get(), F_DUPFD_CLOEXEC, 0));
  if (!*ready_fd) return PosixError(errno, "fault handler: dup of the eventfd");
  pipeline->content_ready = [ready_fd] {
    const uint64_t one = 1;
    (void)!write(ready_fd->get(), &one, sizeof(one));
  };
  pipeline->work_event = std::move(work_event);
  const bool prefetch =
      pipeline->options.prefetch != nullptr && !pipeline->options.prefetch->empty();
  if (prefetch) pipeline->given_prefetch = pipeline->options.prefetch;
  pipeline->given_fill = pipeline->options.fill == FillMode::kBackground;
  if (prefetch || pipeline->given_fill) {
    // Taken up in the VM's first turn, on its worker, as what is given later is; that turn comes
    // now, not at the first fault.
    const uint64_t one = 1;
    (void)!write(pipeline->work_event.get(), &one, sizeof(one));
  }
  return std::unique_ptr<FaultHandler>(new FaultHandler(std::move(pipeline)));
}

FaultHandler::FaultHandler(std::unique_ptr<Pipeline> pipeline) : p_(std::move(pipeline)) {}
FaultHandler::~FaultHandler() = default;

int FaultHandler::fd() const { return p_->uffd.fd(); }
const std::string& FaultHandler::name() const { return p_->options.name; }
const GuestLayout& FaultHandler::layout() const { return p_->layout; }

std::vector<std::unique_ptr<FaultHandler>> FaultHandler::TakeForkedChildren() {
  return std::exchange(p_->children, {});
}

Result<bool> FaultHandler::OwnerAlive() const {
  return p_->uffd.OwnerAlive(p_->layout.regions().front().host_addr);
}

FaultStats FaultHandler::stats() const { return p_->Stats(); }

Status FaultHandler::PostGuestFault(const GuestFault& fault, GuestFaultDone done) {
  if (p_->options.mode != InstallMode::kMinorTrap) {
    return Error(ErrorCode::kFailedPrecondition,
                 p_->options.name + ": guest faults are served only in the minor trap");
  }
  std::lock_guard lock(p_->guest_mu);
  p_->guest_faults.emplace_back(fault, std::move(done));
  const uint64_t one = 1;
  (void)!write(p_->work_event.get(), &one, sizeof(one));
  return OkStatus();
}

Status FaultHandler::StartPrefetch(std::shared_ptr<const WorkingSet> set) {
  if (set == nullptr) return Error(ErrorCode::kInvalidArgument, "fault handler: no working set");
  std::lock_guard lock(p_->guest_mu);
  p_->given_prefetch = std::move(set);
  const uint64_t one = 1;
  (void)!write(p_->work_event.get(), &one, sizeof(one));
  return OkStatus();
}

Status FaultHandler::StartBackgroundFill() {
  std::lock_guard lock(p_->guest_mu);
  p_->given_fill = true;
  const uint64_t one = 1;
  (void)!write(p_->work_event.get(), &one, sizeof(one));
  return OkStatus();
}

void FaultHandler::Pipeline::TakeGivenFill() {
  std::lock_guard lock(guest_mu);
  background_fill_due = background_fill_due || std::exchange(given_fill, false);
}

void FaultHandler::Pipeline::TakeGivenPrefetch() {
  std::shared_ptr<const WorkingSet> set;
  {
    std::lock_guard lock(guest_mu);
    set = std::move(given_prefetch);
  }
  if (set == nullptr) return;
  prefetch_pages = set->Pages();
  prefetch_next = 0;
  prefetched_.assign(PageIndex(layout.file_end()), false);
  prefetch_start = Clock::now();
  AdvisePrefetch();
}

void FaultHandler::Pipeline::AdvisePrefetch() const {
  // Runs merged across gaps of up to this many pages: one larger read beats two seeks.
  constexpr uint64_t kMergeGapPages = 8;
  const PageSource& source = fetcher->source();
  std::vector<uint64_t> pages;
  pages.reserve(prefetch_pages.size());
  for (uint64_t page : prefetch_pages) {
    auto extent = source.ExtentAt(FileOffset(page * kPageSize4K));
    if (extent && extent->kind == ExtentKind::kData) pages.push_back(page);
  }
  std::sort(pages.begin(), pages.end());
  for (size_t i = 0; i < pages.size();) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] - pages[j - 1] <= kMergeGapPages) ++j;
    source.WillNeed(FileOffset(pages[i] * kPageSize4K),
                    (pages[j - 1] + 1 - pages[i]) * kPageSize4K);
    i = j;
  }
}

int FaultHandler::work_fd() const { return p_->work_event.get(); }

FaultStats FaultHandler::Pipeline::Stats() const {
  const Counters& c = counters;
  const InstallCounters& installed = installer->counters();
  FaultStats out;
  out.faults_missing = Get(c.faults_missing);
  out.faults_minor = Get(c.faults_minor);
  out.faults_write_protect = Get(c.faults_write_protect);
  out.faults_stray = Get(c.faults_stray);
  out.faults_guest = Get(c.faults_guest);
  out.pages_prefetched = Get(c.pages_prefetched);
  out.pages_filled = Get(c.pages_filled);
  out.turns = Get(c.turns);
  out.events_remove = Get(c.events_remove);
  out.events_unmap = Get(c.events_unmap);
  out.events_remap = Get(c.events_remap);
  out.events_fork = Get(c.events_fork);
  out.pages_copied = Get(installed.copied);
  out.pages_continued = Get(installed.continued);
  out.pages_zeroed = Get(installed.zeroed);
  out.pages_populated = Get(installed.populated);
  out.pages_poisoned = Get(c.pages_poisoned);
  out.bytes_read = fetcher->bytes_read();
  out.eagain_retries = Get(c.eagain_retries);
  out.content_waits = Get(c.content_waits);
  out.fault_all_us = Get(c.fault_all_us);
  out.first_fault_served_ns = Get(c.first_fault_served_ns);
  out.fill_finished_ns = Get(c.fill_finished_ns);
  out.latency_p50_ns = latency.Percentile(0.50);
  out.latency_p99_ns = latency.Percentile(0.99);
  out.latency_max_ns = latency.max();
  out.prefetch_hits = Get(c.prefetch_hits);
  out.prefetch_misses = Get(c.prefetch_misses);
  out.queue_latency = queue_latency.Snapshot();
  out.fetch_latency = fetch_latency.Snapshot();
  out.install_latency = install_latency.Snapshot();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Turns

Result<bool> FaultHandler::Serve(const ServeBudget& budget) { return p_->Serve(budget); }

std::optional<std::chrono::steady_clock::time_point> FaultHandler::wake_at() const {
  return p_->wake_at;
}

Status FaultHandler::ServeReadyEvents() {
  while (true) {
    GM_ASSIGN_OR_RETURN(bool more, p_->Serve(ServeBudget{}));
    if (!more) return OkStatus();
  }
}

Status FaultHandler::InstallAll() {
  p_->StartFill(FillMode::kAtFirstFault);
  p_->fill_rate.reset();  // a background fill under way: at full speed from now on
  while (p_->fill.has_value()) {
    GM_ASSIGN_OR_RETURN(bool more, p_->Serve(ServeBudget{.fill_bytes = UINT64_MAX}));
    (void)more;
  }
  return OkStatus();
}

Result<bool> FaultHandler::Pipeline::Serve(const ServeBudget& budget) {
  served_this_turn_.clear();
  wake_at.reset();
  Add(counters.turns, 1);
  // Guest faults first: each holds a vCPU stopped. Events read just after are applied before
  // any uffd fault, as ever; a guest fault never needs the uffd, so it cannot meet EAGAIN.
  uint64_t signalled;
  (void)!read(work_event.get(), &signalled, sizeof(signalled));  // this turn does what it said
  const bool more_guest_faults = minor_trap != nullptr && ServeGuestFaults(budget.faults);
  TakeGivenPrefetch();
  TakeGivenFill();
  GM_RETURN_IF_ERROR(ReadEvents(/*after_again=*/false));
  size_t served = 0;
  size_t retries = 0;
  while (!sequencer.empty() && served < budget.faults) {
    const QueuedFault& queued = sequencer.front();
    if (!fault_started_) {
      fault_started_ = Clock::now();
      fetch_ns_ = 0;
      install_ns_ = 0;
    }
    GM_ASSIGN_OR_RETURN(Step step, ServeFault(queued.event));
    // The fault stays queued, first, until its content is there; the worker serves other VMs.
    if (step == Step::kWaitForContent) return more_guest_faults;
    if (step == Step::kRetryAfterDrain) {
      // A non-fault event (a REMOVE, say) is pending and blocks installs until it is read. Read
      // it (and anything behind it), apply it, then retry this fault.
      Add(counters.eagain_retries, 1);
      if (++retries > budget.eagain_retries) return true;  // the fault stays queued
      GM_RETURN_IF_ERROR(ReadEvents(/*after_again=*/true));
      continue;
    }
    const uint64_t service_ns = NanosSince(queued.read_at);
    latency.Record(service_ns);
    TraceFault(queued.event.address, service_ns);
    queue_latency.Record(NanosBetween(queued.read_at, *fault_started_));
    fetch_latency.Record(fetch_ns_);
    install_latency.Record(install_ns_);
    fault_started_.reset();
    if (Get(counters.first_fault_served_ns) == 0) {
      counters.first_fault_served_ns.store(NowNanos(), std::memory_order_relaxed);
    }
    sequencer.pop();
    ++served;
    // Faults that arrived meanwhile are served in this turn too, while it has budget.
    if (sequencer.empty() && served < budget.faults) {
      GM_RETURN_IF_ERROR(ReadEvents(/*after_again=*/false));
    }
  }
  if (!sequencer.empty() || more_guest_faults) return true;
  if (prefetch_next < prefetch_pages.size()) {
    GM_ASSIGN_OR_RETURN(bool more, PrefetchStep(budget));
    if (more) return true;
  }
  // The working set is in (or there is none): the rest may follow.
  if (background_fill_due) StartFill(FillMode::kBackground);
  if (fill.has_value()) {
    GM_ASSIGN_OR_RETURN(bool more, FillStep(budget));
    if (more) return true;
  }
  return last_read_full_;
}

bool FaultHandler::Pipeline::ServeGuestFaults(size_t budget) {
  std::vector<std::pair<GuestFault, GuestFaultDone>> faults;
  {
    std::lock_guard lock(guest_mu);
    const size_t n = std::min(budget, guest_faults.size());
    faults.assign(std::make_move_iterator(guest_faults.begin()),
                  std::make_move_iterator(guest_faults.begin() + static_cast<std::ptrdiff_t>(n)));
    guest_faults.erase(guest_faults.begin(), guest_faults.begin() + static_cast<std::ptrdiff_t>(n));
  }
  for (auto& [fault, done] : faults) {
    Add(counters.faults_guest, 1);
    const auto start = Clock::now();
    const Status status = ServeGuestFault(fault);
    latency.Record(NanosSince(start));
    if (done) done(fault, status);
  }
  std::lock_guard lock(guest_mu);
  return !guest_faults.empty();
}

Status FaultHandler::Pipeline::ServeGuestFault(const GuestFault& fault) {
  auto hit = layout.FindGuest(fault.gpa);
  if (!hit) {
    return Error(ErrorCode::kOutOfRange,
                 options.name + ": guest fault at " + Hex(fault.gpa.value()) + " in no region");
  }
  const GuestRegion region = layout.regions()[hit->region];
  const uint64_t page_offset = AlignDown(hit->offset_in_region, region.page_size);
  if (FateOf(region, page_offset) == PageFate::kPoisoned) {
    return Error(ErrorCode::kDataLoss,
                 Where(region, page_offset) + ": its source could not supply it");
  }
  // A vCPU's fault starts fault-all as a uffd fault does: with the secret-hiding branch it may
  // come first, and the fill is what spares every later page its exit.
  if (options.fill == FillMode::kAtFirstFault) StartFill(FillMode::kAtFirstFault);
  pieces_.clear();
  PlanWindow(layout, WindowForFault(hit->region, page_offset), page_offset,
             /*write_fault=*/false, tracker, fetcher->source(), &pieces_,
             &options.memory_file->pages());
  for (const InstallPiece& piece : pieces_) {
    const bool has_fault = page_offset >= piece.offset && page_offset < piece.offset + piece.length;
    Content content{.kind = piece.kind};
    uint64_t offset = piece.offset;
    uint64_t length = piece.length;
    if (piece.kind == ContentKind::kData) {
      auto fetched = fetcher->Fetch(FileOffset(region.file_offset.value() + offset), length);
      if (!fetched && has_fault && length > region.page_size) {
        // The window's read failed; the faulting page alone may still be readable.
        offset = page_offset;
        length = region.page_size;
        fetched = fetcher->Fetch(FileOffset(region.file_offset.value() + offset), length);
      }
      if (!fetched) {
        if (has_fault) return std::move(fetched).error().WithContext(Where(region, page_offset));
        continue;  // a neighbour: left for its own fault
      }
      content.data = *fetched;
    }
    Status populated = minor_trap->Populate(region, offset, length, content);
    if (!populated) {
      if (has_fault) return std::move(populated).error().WithContext(Where(region, page_offset));
      continue;
    }
    SetFate(region, offset, length, PageFate::kServed);
    ClearUserfaultBits(region, offset, length);
    install_cause_ = TraceRecordType::kFaultInstall;
    TraceInstall(region, offset, length, piece.kind, /*populate=*/true);
    if (options.recorder != nullptr) {
      options.recorder->Append(PageIndex(region.file_offset.value() + offset),
                               length / kPageSize4K);
    }
  }
  return OkStatus();
}

RegionRange FaultHandler::Pipeline::WindowForFault(size_t region, uint64_t page_offset) {
  return options.adaptive_windows ? adaptive.WindowFor(layout, region, page_offset, tracker)
                                  : fault_around.WindowFor(layout, region, page_offset);
}

void FaultHandler::Pipeline::StartFill(FillMode mode) {
  if (fill_started) return;
  fill_started = true;
  filling = mode;
  fill_start = Clock::now();
  fill.emplace();
  if (mode == FillMode::kBackground) {
    const uint64_t rate = options.fill_bytes_per_second;
    fill_rate.emplace(rate, std::max(rate / kFillBurstsPerSecond, kMinFillBurst), fill_start);
  }
}

void FaultHandler::Pipeline::FinishFill() {
  fill.reset();
  fill_rate.reset();
  const uint64_t nanos = NanosSince(fill_start);
  counters.fill_finished_ns.store(NowNanos(), std::memory_order_relaxed);
  if (filling == FillMode::kBackground) {
    // The line tests and operators wait for.
    Log(LogLevel::kInfo,
        options.name + ": fill done: " + std::to_string(Get(counters.pages_filled)) + " pages in " +
            std::to_string(static_cast<double>(nanos) / 1e9) + " s");
    return;
  }
  const uint64_t micros = nanos / 1000;
  Add(counters.fault_all_us, micros);
  // The line Firecracker's performance tests look for.
  Log(LogLevel::kInfo, "Finished Faulting All: " + std::to_string(micros) + "us");
}

Result<bool> FaultHandler::Pipeline::PrefetchStep(const ServeBudget& budget) {
  install_cause_ = TraceRecordType::kPrefetchInstall;
  uint64_t left = std::clamp<uint64_t>(budget.fill_bytes / kPageSize4K, 1, kPrefetchBatchPages);
  size_t retries = 0;
  std::vector<uint64_t> batch;
  std::vector<RegionRange> runs;
  while (prefetch_next < prefetch_pages.size() && left > 0) {
    // The next pages in first-need order, sorted so that neighbours make one install.
    const size_t n =
        std::min<size_t>({left, kPrefetchBatchPages, prefetch_pages.size() - prefetch_next});
    batch.assign(prefetch_pages.begin() + static_cast<std::ptrdiff_t>(prefetch_next),
                 prefetch_pages.begin() + static_cast<std::ptrdiff_t>(prefetch_next + n));
    std::sort(batch.begin(), batch.end());
    runs.clear();
    for (uint64_t page : batch) {
      auto hit = layout.FindFile(FileOffset(page * kPageSize4K));
      if (!hit) continue;  // a snapshot page that no region of this VM holds
      const GuestRegion& region = layout.regions()[hit->region];
      const uint64_t begin = AlignDown(hit->offset_in_region, region.page_size);
      if (!runs.empty() && runs.back().region == hit->region && runs.back().end >= begin &&
          begin + region.page_size - runs.back().begin <= fetcher->capacity()) {
        runs.back().end = std::max(runs.back().end, begin + region.page_size);
      } else {
        runs.push_back(RegionRange{hit->region, begin, begin + region.page_size});
      }
    }
    const uint64_t installed_before = PagesInstalled();
    for (const RegionRange& run : runs) {
      NotePrefetched(run);
      GM_ASSIGN_OR_RETURN(Step step, InstallRange(run, std::nullopt, /*write_fault=*/false));
      if (step == Step::kWaitForContent) {
        Add(counters.pages_prefetched, PagesInstalled() - installed_before);
        return false;  // this batch again once the source has it
      }
      if (step == Step::kRetryAfterDrain) {
        Add(counters.eagain_retries, 1);
        if (++retries > budget.eagain_retries) return true;
        Add(counters.pages_prefetched, PagesInstalled() - installed_before);
        GM_RETURN_IF_ERROR(ReadEvents(/*after_again=*/true));
        return true;  // faults (and the events) first; this batch again next turn
      }
    }
    Add(counters.pages_prefetched, PagesInstalled() - installed_before);
    prefetch_next += n;
    left -= n;
    if (options.recorder != nullptr) options.recorder->NotePrefetched(prefetch_next);
  }
  if (prefetch_next < prefetch_pages.size()) return true;
  Log(LogLevel::kInfo,
      options.name + ": working set in: " + std::to_string(prefetch_pages.size()) +
          " pages learned, " + std::to_string(Get(counters.pages_prefetched)) +
          " installed ahead of faults, in " +
          std::to_string(std::chrono::duration<double>(Clock::now() - prefetch_start).count()) +
          " s");
  return false;
}

Result<bool> FaultHandler::Pipeline::FillStep(const ServeBudget& budget) {
  install_cause_ = TraceRecordType::kFillInstall;
  uint64_t left = budget.fill_bytes;
  size_t retries = 0;
  // Out of budget for now: the engine comes back once `bytes` of it are there, not before.
  auto wait_for = [&](uint64_t bytes, Clock::time_point now) {
    wake_at = fill_rate->When(bytes, now);
    return false;
  };
  while (left > 0) {
    uint64_t chunk_bytes = std::min({left, kFillChunk, fetcher->capacity()});
    const Clock::time_point now = Clock::now();
    uint64_t allowed = UINT64_MAX;
    if (fill_rate) {
      allowed = fill_rate->Available(now);
      const uint64_t wanted = std::min(kFillGrainBytes, left);
      if (allowed < wanted) return wait_for(wanted, now);
      chunk_bytes = std::min(chunk_bytes, allowed);
    }
    std::optional<RegionRange> chunk = fill->Next(layout, tracker, chunk_bytes);
    if (!chunk) {
      FinishFill();
      return false;
    }
    const uint64_t span = chunk->end - chunk->begin;
    if (span > allowed) return wait_for(span, now);  // a huge page, larger than what is there
    const uint64_t installed_before = PagesInstalled();
    GM_ASSIGN_OR_RETURN(Step step, InstallRange(*chunk, std::nullopt, /*write_fault=*/false));
    const uint64_t installed = PagesInstalled() - installed_before;
    Add(counters.pages_filled, installed);
    if (fill_rate) fill_rate->Take(installed * kPageSize4K, Clock::now());
    if (step == Step::kWaitForContent) return false;  // this chunk again once the source has it
    if (step == Step::kRetryAfterDrain) {
      Add(counters.eagain_retries, 1);
      if (++retries > budget.eagain_retries) return true;
      GM_RETURN_IF_ERROR(ReadEvents(/*after_again=*/true));
      if (!sequencer.empty()) return true;  // faults go first: the next turn serves them
      continue;                             // the same chunk again: served pages are skipped
    }
    fill->Advance(*chunk);
    left -= std::min(left, span);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Events

Status FaultHandler::Pipeline::ReadEvents(bool after_again) {
  GM_ASSIGN_OR_RETURN(size_t read, after_again ? sequencer.ReadAfterAgain(&changes_, kEventWait)
                                               : sequencer.Read(&changes_));
  last_read_full_ = read == sequencer.batch();
  return ApplyChanges();
}

Status FaultHandler::Pipeline::ApplyChanges() {
  Status status;
  for (UffdEvent& event : changes_) {
    if (auto* remove = std::get_if<RemoveEvent>(&event)) {
      Add(counters.events_remove, 1);
      ApplyRemove(remove->start, remove->end);
    } else if (auto* unmap = std::get_if<UnmapEvent>(&event)) {
      Add(counters.events_unmap, 1);
      ApplyUnmap(unmap->start, unmap->end);
    } else if (auto* remap = std::get_if<RemapEvent>(&event)) {
      Add(counters.events_remap, 1);
      if (status) status = ApplyRemap(*remap);
    } else if (auto* fork = std::get_if<ForkEvent>(&event)) {
      Add(counters.events_fork, 1);
      if (status) status = ApplyFork(*fork);
    }
  }
  changes_.clear();
  return status;
}

template <typename Fn>
void FaultHandler::Pipeline::ForEachOverlap(HostVirtAddr start, HostVirtAddr end, Fn fn) {
  for (const GuestRegion& region : layout.regions()) {
    const uint64_t lo = std::max(start.value(), region.host_addr.value());
    const uint64_t hi = std::min(end.value(), region.host_addr.value() + region.size);
    if (lo >= hi) continue;
    // Whole pages only: the kernel reports page-aligned ranges, but be strict.
    const uint64_t first = AlignUp(lo - region.host_addr.value(), region.page_size).value_or(hi);
    const uint64_t last = AlignDown(hi - region.host_addr.value(), region.page_size);
    if (first < last) fn(region, first, last - first);
  }
}

void FaultHandler::Pipeline::ApplyRemove(HostVirtAddr start, HostVirtAddr end) {
  ForEachOverlap(start, end, [&](const GuestRegion& region, uint64_t offset, uint64_t length) {
    // Before anything else: whatever a fault or a fill does from now on in this range, including
    // installs that land before the kernel's zap, the range reads zero afterwards.
    SetFate(region, offset, length, PageFate::kRemoved);
    if (options.mode == InstallMode::kMinorTrap) {
      // MADV_DONTNEED on a shared mapping only drops the page-table entries; the content would
      // come back on the next (minor) fault. The balloon wants zeros: punch the file.
      const uint64_t file_offset = region.file_offset.value() + offset;
      auto punched = options.memory_file->PunchHole(FileOffset(file_offset), length);
      if (!punched) {
        Log(LogLevel::kWarning,
            options.name + ": removing " + Hex(length) + " bytes at offset " + Hex(file_offset) +
                " from the guest memory file failed: " + punched.error().ToString());
      }
    }
  });
}

void FaultHandler::Pipeline::ApplyUnmap(HostVirtAddr start, HostVirtAddr end) {
  // The content went with the mapping: a new mapping there starts from zeros.
  ForEachOverlap(start, end, [&](const GuestRegion& region, uint64_t offset, uint64_t length) {
    SetFate(region, offset, length, PageFate::kRemoved);
  });
}

Status FaultHandler::Pipeline::ApplyRemap(const RemapEvent& remap) {
  // Guest memory moves as whole regions (a VMM never splits a region with mremap); follow it.
  std::vector<GuestRegion> regions = layout.regions();
  for (GuestRegion& region : regions) {
    if (region.host_addr == remap.from && region.size == remap.length) {
      region.host_addr = remap.to;
      GM_ASSIGN_OR_RETURN(layout, GuestLayout::Create(std::move(regions)));
      Log(LogLevel::kInfo, options.name + ": region moved from " + Hex(remap.from.value()) +
                               " to " + Hex(remap.to.value()));
      return OkStatus();
    }
  }
  return Error(ErrorCode::kUnsupported, options.name + ": mremap of " + Hex(remap.length) +
                                            " bytes from " + Hex(remap.from.value()) +
                                            " does not move one whole region");
}

Status FaultHandler::Pipeline::ApplyFork(ForkEvent& fork) {
  GM_ASSIGN_OR_RETURN(Userfaultfd child_uffd,
                      Userfaultfd::Adopt(std::move(fork.child_uffd), uffd.features()));
  FaultHandlerOptions child_options = options;
  child_options.name = options.name + " (fork)";
  child_options.tracker = nullptr;  // the child's memory is a copy: its own tracker
  child_options.resume = false;
  child_options.userfault_bitmap = nullptr;  // KVM maps the parent's memory, not the child's
  child_options.trace = nullptr;             // the child may be served by another thread
  GM_ASSIGN_OR_RETURN(auto child,
                      FaultHandler::Create(std::move(child_uffd), layout, fetcher->shared_source(),
                                           std::move(child_options)));
  // The child starts with a copy of the parent's memory (poison included): its pages' fates too.
  child->p_->tracker.CopyFrom(tracker);
  children.push_back(std::move(child));
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Faults

Result<Step> FaultHandler::Pipeline::ServeFault(const PagefaultEvent& fault) {
  switch (fault.kind) {
    case PagefaultKind::kMissing:
      Add(counters.faults_missing, 1);
      break;
    case PagefaultKind::kMinor:
      Add(counters.faults_minor, 1);
      break;
    case PagefaultKind::kWriteProtect:
      Add(counters.faults_write_protect, 1);
      break;
  }
  auto hit = layout.FindHost(fault.address);
  if (!hit) return ServeStray(fault);
  const GuestRegion& region = layout.regions()[hit->region];
  const uint64_t page_offset = AlignDown(hit->offset_in_region, region.page_size);
  const HostVirtAddr page_host = region.host_addr.UncheckedAdd(page_offset);
  if (fault.kind == PagefaultKind::kWriteProtect) {
    // guestmem never write-protects guest memory itself; whoever registered WP gets the page
    // unprotected so the guest can go on.
    GM_RETURN_IF_ERROR(uffd.WriteProtect(page_host, region.page_size, /*protect=*/false));
    return Step::kDone;
  }
  if (FateOf(region, page_offset) == PageFate::kPoisoned) {
    // A fault queued before the page was poisoned: poison stays until the guest discards it.
    return Poison(region, page_offset,
                  Error(ErrorCode::kDataLoss, "its source could not supply it before"));
  }
  if (ServedThisTurn(hit->region, page_offset)) {
    GM_RETURN_IF_ERROR(uffd.Wake(page_host, region.page_size));
    return Step::kDone;
  }
  if (!prefetched_.empty()) CountPrefetchOutcome(region, page_offset);
  if (options.fill == FillMode::kAtFirstFault) StartFill(FillMode::kAtFirstFault);
  install_cause_ = TraceRecordType::kFaultInstall;
  // A fill in progress may not have reached this part yet: the fault brings its window.
  const RegionRange range = WindowForFault(hit->region, page_offset);
  GM_ASSIGN_OR_RETURN(Step step, InstallRange(range, page_offset, fault.write, /*record=*/true));
  if (step == Step::kDone) served_this_turn_.push_back(range);
  return step;
}

Result<Step> FaultHandler::Pipeline::ServeStray(const PagefaultEvent& fault) {
  const uint64_t count = counters.faults_stray.fetch_add(1, std::memory_order_relaxed) + 1;
  const std::string where =
      options.name + ": fault at " + Hex(fault.address.value()) + " outside its regions";
  if (count > options.max_stray_faults) {
    return Error(ErrorCode::kProtocolError,
                 where + ": " + std::to_string(count) + " such faults; giving up the VM");
  }
  // Nothing guestmem knows belongs there: the access gets SIGBUS rather than a retry that would
  // fault again at once. If nothing is mapped there any more (a fault queued before an munmap),
  // the thread is woken to find out for itself.
  const HostVirtAddr page = fault.address.AlignDown(kPageSize4K);
  auto poisoned = uffd.Poison(page, kPageSize4K);
  const bool did_poison = poisoned && poisoned->outcome == UffdProgress::Outcome::kDone;
  if (poisoned && poisoned->outcome == UffdProgress::Outcome::kAgain) return Step::kRetryAfterDrain;
  if (poisoned && poisoned->outcome == UffdProgress::Outcome::kTaskGone) {
    return TaskGone(options.name);
  }
  if (!did_poison) (void)uffd.Wake(page, kPageSize4K);
  if (IsPowerOfTen(count)) {
    Log(LogLevel::kWarning,
        where + " (" + std::to_string(count) + " so far): " + (did_poison ? "poisoned" : "woken"));
  }
  return Step::kDone;
}

Result<Step> FaultHandler::Pipeline::InstallRange(const RegionRange& range,
                                                  std::optional<uint64_t> fault_page,
                                                  bool write_fault, bool record) {
  const GuestRegion region = layout.regions()[range.region];  // copy: a REMAP rebuilds layout
  pieces_.clear();
  const PageStateMap* file_pages =
      options.mode == InstallMode::kMinorTrap ? &options.memory_file->pages() : nullptr;
  PlanWindow(layout, range, fault_page, write_fault, tracker, fetcher->source(), &pieces_,
             file_pages);
  // The whole window's content first, or none of it installed yet: a window half installed would
  // wake its guest into the other half's faults while this one waits.
  const FileOffset first(region.file_offset.value() + range.begin);
  if (waited_for != first) {
    bool ready = true;
    for (const InstallPiece& piece : pieces_) {
      if (piece.kind != ContentKind::kData) continue;
      ready &= fetcher->source().ContentReady(
          FileOffset(region.file_offset.value() + piece.offset), piece.length, content_ready);
    }
    if (!ready) {
      waited_for = first;
      Add(counters.content_waits, 1);
      return Step::kWaitForContent;
    }
  }
  waited_for.reset();
  for (const InstallPiece& piece : pieces_) {
    const bool has_fault =
        fault_page && *fault_page >= piece.offset && *fault_page < piece.offset + piece.length;
    GM_ASSIGN_OR_RETURN(
        Step step, InstallContent(region, piece, has_fault ? fault_page : std::nullopt, record));
    if (step != Step::kDone) return step;
  }
  return Step::kDone;
}

Result<Step> FaultHandler::Pipeline::InstallContent(const GuestRegion& region,
                                                    const InstallPiece& piece,
                                                    std::optional<uint64_t> fault_page,
                                                    bool record) {
  // A piece that cannot be installed: a neighbour fetched speculatively is left for its own
  // fault; the faulting page is tried alone, and poisoned if it fails alone too.
  auto failed = [&](const Error& why) -> Result<Step> {
    if (!fault_page) {
      Log(LogLevel::kDebug, Where(region, piece.offset) + ": " + Hex(piece.length) +
                                " bytes skipped: " + why.ToString());
      return Step::kDone;
    }
    if (piece.length > region.page_size) {
      return InstallContent(region, {*fault_page, region.page_size, piece.kind}, fault_page,
                            record);
    }
    return Poison(region, *fault_page, why);
  };
  Content content{.kind = piece.kind};
  if (piece.kind == ContentKind::kData) {
    const auto start = Clock::now();
    auto fetched =
        fetcher->Fetch(FileOffset(region.file_offset.value() + piece.offset), piece.length);
    fetch_ns_ += NanosSince(start);
    if (!fetched) return failed(fetched.error());
    content.data = *fetched;
  }
  const auto start = Clock::now();
  auto progress = installer->Install(region, piece.offset, piece.length, content);
  install_ns_ += NanosSince(start);
  if (!progress) return failed(progress.error());
  SetFate(region, piece.offset, progress->bytes, PageFate::kServed);
  ClearUserfaultBits(region, piece.offset, progress->bytes);
  TraceInstall(region, piece.offset, progress->bytes, piece.kind);
  if (record && options.recorder != nullptr && progress->bytes > 0) {
    options.recorder->Append(PageIndex(region.file_offset.value() + piece.offset),
                             progress->bytes / kPageSize4K);
  }
  switch (progress->outcome) {
    case InstallProgress::Outcome::kDone:
      return Step::kDone;
    case InstallProgress::Outcome::kAgain:
      return Step::kRetryAfterDrain;
    case InstallProgress::Outcome::kNoMapping: {
      // The page at `gone` is no longer mapped (the VM unmapped it while its faults were queued;
      // its UNMAP event says so for the whole range). Whoever waits there is woken. The rest of
      // the piece stays pending: a window can reach past an unmapped hole into memory that is
      // still mapped, whose content must still come from the snapshot. The fault's own page, if
      // it lies past the hole, is installed alone.
      const uint64_t gone = piece.offset + progress->bytes;
      (void)uffd.Wake(region.host_addr.UncheckedAdd(gone), region.page_size);
      Log(LogLevel::kDebug, Where(region, gone) + ": no longer mapped; woken");
      if (fault_page && *fault_page > gone) {
        return InstallContent(region, {*fault_page, region.page_size, piece.kind}, fault_page,
                              record);
      }
      return Step::kDone;
    }
    case InstallProgress::Outcome::kTaskGone:
      return TaskGone(options.name);
  }
  return Error(ErrorCode::kInternal, "fault handler: unknown install outcome");
}

Result<Step> FaultHandler::Pipeline::Poison(const GuestRegion& region, uint64_t page_offset,
                                            const Error& why) {
  const HostVirtAddr host = region.host_addr.UncheckedAdd(page_offset);
  const bool again = FateOf(region, page_offset) == PageFate::kPoisoned;
  auto poisoned = uffd.Poison(host, region.page_size);
  if (poisoned) {
    switch (poisoned->outcome) {
      case UffdProgress::Outcome::kDone:
        SetFate(region, page_offset, region.page_size, PageFate::kPoisoned);
        if (!again) {
          Add(counters.pages_poisoned, region.page_size / kPageSize4K);
          Log(LogLevel::kError, Where(region, page_offset) +
                                    " poisoned (the VM gets SIGBUS there): " + why.ToString());
        }
        return Step::kDone;
      case UffdProgress::Outcome::kAgain:
        return Step::kRetryAfterDrain;
      case UffdProgress::Outcome::kExists:     // mapped meanwhile, or poisoned already
      case UffdProgress::Outcome::kNoMapping:  // unmapped meanwhile: nobody to serve
        (void)uffd.Wake(host, region.page_size);
        return Step::kDone;
      case UffdProgress::Outcome::kTaskGone:
        return TaskGone(options.name);
    }
  }
  // No UFFDIO_POISON on this uffd: never install zeros where data was expected. Fail the VM.
  Log(LogLevel::kError,
      Where(region, page_offset) +
          " cannot be served and cannot be poisoned; giving up the VM: " + why.ToString());
  return Error(why.code(), Where(region, page_offset) + ": " + why.context(), why.sys_errno());
}

FaultStats& FaultStats::operator+=(const FaultStats& o) {
  faults_missing += o.faults_missing;
  faults_minor += o.faults_minor;
  faults_write_protect += o.faults_write_protect;
  faults_stray += o.faults_stray;
  faults_guest += o.faults_guest;
  events_remove += o.events_remove;
  events_unmap += o.events_unmap;
  events_remap += o.events_remap;
  events_fork += o.events_fork;
  pages_copied += o.pages_copied;
  pages_continued += o.pages_continued;
  pages_zeroed += o.pages_zeroed;
  pages_populated += o.pages_populated;
  pages_prefetched += o.pages_prefetched;
  pages_filled += o.pages_filled;
  prefetch_hits += o.prefetch_hits;
  prefetch_misses += o.prefetch_misses;
  pages_poisoned += o.pages_poisoned;
  bytes_read += o.bytes_read;
  eagain_retries += o.eagain_retries;
  content_waits += o.content_waits;
  latency_p50_ns = std::max(latency_p50_ns, o.latency_p50_ns);
  latency_p99_ns = std::max(latency_p99_ns, o.latency_p99_ns);
  latency_max_ns = std::max(latency_max_ns, o.latency_max_ns);
  queue_latency += o.queue_latency;
  fetch_latency += o.fetch_latency;
  install_latency += o.install_latency;
  fault_all_us = std::max(fault_all_us, o.fault_all_us);
  first_fault_served_ns = std::max(first_fault_served_ns, o.first_fault_served_ns);
  fill_finished_ns = std::max(fill_finished_ns, o.fill_finished_ns);
  return *this;
}

std::string FaultStats::ToString() const {
  auto us = [](uint64_t ns) { return std::to_string(ns / 1000) + "us"; };
  std::string out = "faults=" + std::to_string(faults()) + " (missing " +
                    std::to_string(faults_missing) + ", minor " + std::to_string(faults_minor) +
                    ", wp " + std::to_string(faults_write_protect) + ") pages: copied " +
                    std::to_string(pages_copied) + ", continued " +
                    std::to_string(pages_continued) + ", zeroed " + std::to_string(pages_zeroed) +
                    ", poisoned " + std::to_string(pages_poisoned) + "; read " +
                    std::to_string(bytes_read >> 20) + " MiB; latency p50 " + us(latency_p50_ns) +
                    " p99 " + us(latency_p99_ns) + " max " + us(latency_max_ns);
  if (faults_stray > 0) out += "; outside regions " + std::to_string(faults_stray);
  if (faults_guest > 0) {
    out += "; guest faults " + std::to_string(faults_guest) + ", pages populated " +
           std::to_string(pages_populated);
  }
  if (events_remove + events_unmap + events_remap + events_fork > 0) {
    out += "; events: remove " + std::to_string(events_remove) + ", unmap " +
           std::to_string(events_unmap) + ", remap " + std::to_string(events_remap) + ", fork " +
           std::to_string(events_fork);
  }
  if (eagain_retries > 0) out += "; eagain retries " + std::to_string(eagain_retries);
  if (content_waits > 0) out += "; waited for content " + std::to_string(content_waits) + " times";
  if (fault_all_us > 0) out += "; fault-all " + std::to_string(fault_all_us) + "us";
  if (pages_filled > 0) out += "; filled " + std::to_string(pages_filled) + " pages";
  if (pages_prefetched > 0) out += "; prefetched " + std::to_string(pages_prefetched) + " pages";
  return out;
}

}  // namespace guestmem
