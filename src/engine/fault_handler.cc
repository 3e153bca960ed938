#include "guestmem/fault_handler.h"

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <variant>

#include "base/hex.h"
#include "engine/latency_histogram.h"
#include "guestmem/log.h"
#include "guestmem/mapping.h"
#include "guestmem/page_state.h"

namespace guestmem {
namespace {

// The handler's own page map (4 KiB granularity, indexed by source offset) reuses PageStateMap's
// four states with these meanings:
constexpr PageState kNotInstalled = PageState::kAbsent;  // never installed: fetch from source
constexpr PageState kInstalled = PageState::kPrepared;   // mapped in the VM (or poisoned)
constexpr PageState kZeroOnFault = PageState::kRemoved;  // removed by the balloon: reads as zero
constexpr PageState kUnmapped = PageState::kAllocated;   // unmapped by the VM: never install

// Fault-all installs in chunks this large: big enough that ioctl overhead vanishes, small enough
// that a fault elsewhere is not kept waiting long.
constexpr uint64_t kInstallAllChunk = 4 << 20;
constexpr size_t kEventBatch = 64;

enum class ContentKind {
  kData,  // from the source
  kZero,  // zeros: the shared zero page where the memory allows
  // Zeros the guest is about to write (a write fault's window): installed as real zeroed pages,
  // because a shared zero page would take a copy-on-write fault right after.
  kZeroToWrite,
};

// What one install step asks of its caller.
enum class Step {
  kDone,
  kRetryAfterDrain,  // EAGAIN: read pending events, then try again
};

uint64_t NanosSince(std::chrono::steady_clock::time_point start) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count());
}

struct Counters {
  std::atomic<uint64_t> faults_missing{0}, faults_minor{0}, faults_write_protect{0};
  std::atomic<uint64_t> events_remove{0}, events_unmap{0}, events_remap{0}, events_fork{0};
  std::atomic<uint64_t> pages_copied{0}, pages_continued{0}, pages_zeroed{0}, pages_poisoned{0};
  std::atomic<uint64_t> bytes_read{0}, eagain_retries{0}, fault_all_us{0};
};

void Add(std::atomic<uint64_t>& counter, uint64_t n) {
  counter.fetch_add(n, std::memory_order_relaxed);
}

}  // namespace

struct FaultHandler::State {
  State(Userfaultfd u, GuestLayout l, std::shared_ptr<const PageSource> src, FaultHandlerOptions o,
        Mapping buf, Mapping zeros)
      : uffd(std::move(u)),
        layout(std::move(l)),
        source(std::move(src)),
        options(std::move(o)),
        installed(layout.file_end() / kPageSize4K),
        buffer(std::move(buf)),
        zero_page(std::move(zeros)) {}

  Userfaultfd uffd;
  GuestLayout layout;
  std::shared_ptr<const PageSource> source;
  FaultHandlerOptions options;
  PageStateMap installed;
  Mapping buffer;  // content staging: max(fault-around window, 2 MiB, fault-all chunk)
  // 2 MiB of zeros: the copy source for zero huge pages (UFFDIO_ZEROPAGE is not for hugetlb) and
  // for zero pages a write fault is about to dirty.
  Mapping zero_page;
  bool fault_all_done = false;
  Counters counters;
  LatencyHistogram latency;
  std::vector<UffdEvent> events;
  std::vector<PagefaultEvent> faults;
  // Source ranges [begin, end) installed for the faults of the batch being served. Threads that
  // fault on the same page before it is installed each queue an event; the install wakes them
  // all, so the later events of the batch need no second read of the source.
  std::vector<std::pair<uint64_t, uint64_t>> batch_installed;
  std::vector<std::unique_ptr<FaultHandler>> children;

  // --- page map helpers (all offsets are source offsets) -----------------------------------
  static uint64_t PageIndex(uint64_t file_offset) { return file_offset / kPageSize4K; }
  PageState StateOf(uint64_t file_offset) const { return installed.Get(PageIndex(file_offset)); }
  void SetState(uint64_t file_offset, uint64_t length, PageState state) {
    installed.Set(PageIndex(file_offset), length / kPageSize4K, state);
  }
  bool InstalledThisBatch(uint64_t file_offset) const {
    if (StateOf(file_offset) != kInstalled) return false;  // removed since: serve it again
    return std::any_of(batch_installed.begin(), batch_installed.end(), [&](const auto& range) {
      return file_offset >= range.first && file_offset < range.second;
    });
  }

  // --- installing -------------------------------------------------------------------------
  // Installs what is not installed yet in [begin, end) of the region, and the faulting page.
  Result<Step> InstallWindow(size_t region_index, uint64_t begin, uint64_t end, bool write_fault,
                             std::optional<uint64_t> fault_page);
  Result<Step> InstallPiece(const GuestRegion& region, uint64_t offset, uint64_t length,
                            ContentKind kind);
  Result<Step> InstallPieceByCopy(const GuestRegion& region, uint64_t offset, uint64_t length,
                                  ContentKind kind);
  Result<Step> InstallPieceInFile(const GuestRegion& region, uint64_t offset, uint64_t length,
                                  ContentKind kind);
  // Applies the outcome of one uffd install of [offset, offset + length) of `region`. On
  // EEXIST the rest is retried page by page through `install_one`.
  template <typename InstallOne>
  Result<Step> Settle(const Result<UffdProgress>& progress, const GuestRegion& region,
                      uint64_t offset, uint64_t length, std::atomic<uint64_t>& counter,
                      InstallOne install_one);
  Result<Step> Poison(const GuestRegion& region, uint64_t page_offset, const Error& why);

  // --- events -----------------------------------------------------------------------------
  Status ApplyEvent(UffdEvent& event);
  void ApplyRemove(HostVirtAddr start, HostVirtAddr end);
  void ApplyUnmap(HostVirtAddr start, HostVirtAddr end);
  Status ApplyRemap(const RemapEvent& remap);
  Status ApplyFork(ForkEvent& fork);
  Result<Step> ServeFault(const PagefaultEvent& fault);
  // Reads one batch of events, applies the non-fault ones, queues the faults. Returns how many
  // events were read.
  Result<size_t> ReadBatch();

  template <typename Fn>
  void ForEachOverlap(HostVirtAddr start, HostVirtAddr end, Fn fn);
  std::string Where(const GuestRegion& region, uint64_t offset) const {
    return options.name + ": page at " + Hex(region.host_addr.value() + offset) + " (offset " +
           Hex(region.file_offset.value() + offset) + ")";
  }
};

// ---------------------------------------------------------------------------------------------
// Creation

Result<std::unique_ptr<FaultHandler>> FaultHandler::Create(Userfaultfd uffd, GuestLayout layout,
                                                           std::shared_ptr<const PageSource> source,
                                                           FaultHandlerOptions options) {
  if (source == nullptr) return Error(ErrorCode::kInvalidArgument, "fault handler: no source");
  const uint64_t window = options.fault_around_bytes;
  if (window < kPageSize4K || !IsPowerOfTwo(window) || window > (uint64_t{1} << 30)) {
    return Error(ErrorCode::kInvalidArgument, "fault handler: fault-around window " +
                                                  std::to_string(window) +
                                                  " is not a power of two between 4096 and 1 GiB");
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
  uint64_t buffer_size = std::max(window, kHugePageSize2M);
  if (options.fault_all) buffer_size = std::max(buffer_size, kInstallAllChunk);
  GM_ASSIGN_OR_RETURN(Mapping buffer, Mapping::Anonymous(buffer_size, MAP_NORESERVE));
  // Never written: every page of it is the kernel's shared zero page, so it costs no memory.
  GM_ASSIGN_OR_RETURN(Mapping zeros,
                      Mapping::Map(std::max(window, kHugePageSize2M), PROT_READ,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  auto state = std::make_unique<State>(std::move(uffd), std::move(layout), std::move(source),
                                       std::move(options), std::move(buffer), std::move(zeros));
  return std::unique_ptr<FaultHandler>(new FaultHandler(std::move(state)));
}

FaultHandler::FaultHandler(std::unique_ptr<State> state) : s_(std::move(state)) {}
FaultHandler::~FaultHandler() = default;

int FaultHandler::fd() const { return s_->uffd.fd(); }
const std::string& FaultHandler::name() const { return s_->options.name; }
const GuestLayout& FaultHandler::layout() const { return s_->layout; }

std::vector<std::unique_ptr<FaultHandler>> FaultHandler::TakeForkedChildren() {
  return std::exchange(s_->children, {});
}

FaultStats FaultHandler::stats() const {
  const Counters& c = s_->counters;
  auto get = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  FaultStats out;
  out.faults_missing = get(c.faults_missing);
  out.faults_minor = get(c.faults_minor);
  out.faults_write_protect = get(c.faults_write_protect);
  out.events_remove = get(c.events_remove);
  out.events_unmap = get(c.events_unmap);
  out.events_remap = get(c.events_remap);
  out.events_fork = get(c.events_fork);
  out.pages_copied = get(c.pages_copied);
  out.pages_continued = get(c.pages_continued);
  out.pages_zeroed = get(c.pages_zeroed);
  out.pages_poisoned = get(c.pages_poisoned);
  out.bytes_read = get(c.bytes_read);
  out.eagain_retries = get(c.eagain_retries);
  out.fault_all_us = get(c.fault_all_us);
  out.latency_p50_ns = s_->latency.Percentile(0.50);
  out.latency_p99_ns = s_->latency.Percentile(0.99);
  out.latency_max_ns = s_->latency.max();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Serving events

Status FaultHandler::ServeReadyEvents() {
  State& s = *s_;
  while (true) {
    GM_ASSIGN_OR_RETURN(size_t read, s.ReadBatch());
    if (read == 0 && s.faults.empty()) return OkStatus();
    const auto batch_start = std::chrono::steady_clock::now();
    size_t next = 0;
    while (next < s.faults.size()) {
      const PagefaultEvent fault = s.faults[next];
      GM_ASSIGN_OR_RETURN(Step step, s.ServeFault(fault));
      if (step == Step::kRetryAfterDrain) {
        // A non-fault event (a REMOVE, say) is pending and blocks installs until it is read.
        // Read it (and anything behind it), apply it, then retry this fault.
        Add(s.counters.eagain_retries, 1);
        GM_ASSIGN_OR_RETURN(size_t drained, s.ReadBatch());
        if (drained == 0) sched_yield();  // the event is not readable yet
        continue;
      }
      s.latency.Record(NanosSince(batch_start));
      ++next;
    }
    s.faults.clear();
    s.batch_installed.clear();
    if (s.options.fault_all && !s.fault_all_done) GM_RETURN_IF_ERROR(InstallAll());
  }
}

Result<size_t> FaultHandler::State::ReadBatch() {
  events.clear();
  GM_ASSIGN_OR_RETURN(size_t count, uffd.ReadEvents(&events, kEventBatch));
  // Non-fault events first: a REMOVE read in the same batch as a fault may precede it.
  for (UffdEvent& event : events) {
    if (auto* fault = std::get_if<PagefaultEvent>(&event)) {
      faults.push_back(*fault);
    } else {
      GM_RETURN_IF_ERROR(ApplyEvent(event));
    }
  }
  return count;
}

Status FaultHandler::State::ApplyEvent(UffdEvent& event) {
  if (auto* remove = std::get_if<RemoveEvent>(&event)) {
    Add(counters.events_remove, 1);
    ApplyRemove(remove->start, remove->end);
  } else if (auto* unmap = std::get_if<UnmapEvent>(&event)) {
    Add(counters.events_unmap, 1);
    ApplyUnmap(unmap->start, unmap->end);
  } else if (auto* remap = std::get_if<RemapEvent>(&event)) {
    Add(counters.events_remap, 1);
    return ApplyRemap(*remap);
  } else if (auto* fork = std::get_if<ForkEvent>(&event)) {
    Add(counters.events_fork, 1);
    return ApplyFork(*fork);
  }
  return OkStatus();
}

template <typename Fn>
void FaultHandler::State::ForEachOverlap(HostVirtAddr start, HostVirtAddr end, Fn fn) {
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

void FaultHandler::State::ApplyRemove(HostVirtAddr start, HostVirtAddr end) {
  ForEachOverlap(start, end, [&](const GuestRegion& region, uint64_t offset, uint64_t length) {
    const uint64_t file_offset = region.file_offset.value() + offset;
    if (options.mode == InstallMode::kMinorTrap) {
      // MADV_DONTNEED on a shared mapping only drops the page-table entries; the content would
      // come back on the next (minor) fault. The balloon wants zeros: punch the file.
      auto punched = options.memory_file->PunchHole(FileOffset(file_offset), length);
      if (!punched) {
        Log(LogLevel::kWarning,
            options.name + ": removing " + Hex(length) + " bytes at offset " + Hex(file_offset) +
                " from the guest memory file failed: " + punched.error().ToString());
      }
    }
    SetState(file_offset, length, kZeroOnFault);
  });
}

void FaultHandler::State::ApplyUnmap(HostVirtAddr start, HostVirtAddr end) {
  ForEachOverlap(start, end, [&](const GuestRegion& region, uint64_t offset, uint64_t length) {
    SetState(region.file_offset.value() + offset, length, kUnmapped);
  });
}

Status FaultHandler::State::ApplyRemap(const RemapEvent& remap) {
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

Status FaultHandler::State::ApplyFork(ForkEvent& fork) {
  GM_ASSIGN_OR_RETURN(Userfaultfd child_uffd,
                      Userfaultfd::Adopt(std::move(fork.child_uffd), uffd.features()));
  FaultHandlerOptions child_options = options;
  child_options.name = options.name + " (fork)";
  GM_ASSIGN_OR_RETURN(auto child, FaultHandler::Create(std::move(child_uffd), layout, source,
                                                       std::move(child_options)));
  // The child starts with a copy of the parent's memory: what is installed here is there too.
  const uint64_t pages = installed.page_count();
  for (uint64_t p = 0; p < pages; ++p) {
    PageState state = installed.Get(p);
    if (state != kNotInstalled) child->s_->installed.Set(p, 1, state);
  }
  children.push_back(std::move(child));
  return OkStatus();
}

Result<Step> FaultHandler::State::ServeFault(const PagefaultEvent& fault) {
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
  if (!hit) {
    // Not guest memory we serve (a range unmapped after the fault was queued): let the thread
    // retry the access; the kernel decides what it finds.
    auto woken = uffd.Wake(fault.address.AlignDown(kPageSize4K), kPageSize4K);
    (void)woken;
    return Step::kDone;
  }
  const GuestRegion& region = layout.regions()[hit->region];
  const uint64_t page_offset = AlignDown(hit->offset_in_region, region.page_size);
  if (fault.kind == PagefaultKind::kWriteProtect) {
    // guestmem never write-protects guest memory itself; whoever registered WP gets the page
    // unprotected so the guest can go on.
    GM_RETURN_IF_ERROR(uffd.WriteProtect(region.host_addr.UncheckedAdd(page_offset),
                                         region.page_size, /*protect=*/false));
    return Step::kDone;
  }
  const uint64_t file_base = region.file_offset.value();
  if (InstalledThisBatch(file_base + page_offset)) {
    GM_RETURN_IF_ERROR(uffd.Wake(region.host_addr.UncheckedAdd(page_offset), region.page_size));
    return Step::kDone;
  }
  uint64_t begin = page_offset;
  uint64_t end = page_offset + region.page_size;
  if (region.page_size == kPageSize4K && !(options.fault_all && !fault_all_done)) {
    begin = AlignDown(page_offset, options.fault_around_bytes);
    end = std::min(begin + options.fault_around_bytes, region.size);
  }
  GM_ASSIGN_OR_RETURN(Step step, InstallWindow(hit->region, begin, end, fault.write, page_offset));
  if (step == Step::kDone) batch_installed.emplace_back(file_base + begin, file_base + end);
  return step;
}

// ---------------------------------------------------------------------------------------------
// Installing content

Status FaultHandler::InstallAll() {
  State& s = *s_;
  const auto start = std::chrono::steady_clock::now();
  const uint64_t chunk = std::min<uint64_t>(kInstallAllChunk, s.buffer.size());
  for (size_t i = 0; i < s.layout.regions().size(); ++i) {
    const uint64_t size = s.layout.regions()[i].size;
    for (uint64_t offset = 0; offset < size;) {
      const uint64_t end = std::min(offset + chunk, size);
      GM_ASSIGN_OR_RETURN(Step step,
                          s.InstallWindow(i, offset, end, /*write_fault=*/false, std::nullopt));
      if (step == Step::kRetryAfterDrain) {
        Add(s.counters.eagain_retries, 1);
        GM_ASSIGN_OR_RETURN(size_t drained, s.ReadBatch());
        if (drained == 0) sched_yield();
        continue;  // the same chunk again: installed pages are skipped
      }
      offset = end;
    }
  }
  s.fault_all_done = true;
  const uint64_t micros = NanosSince(start) / 1000;
  Add(s.counters.fault_all_us, micros);
  // The line Firecracker's performance tests look for.
  Log(LogLevel::kInfo, "Finished Faulting All: " + std::to_string(micros) + "us");
  return OkStatus();
}

Result<Step> FaultHandler::State::InstallWindow(size_t region_index, uint64_t begin, uint64_t end,
                                                bool write_fault,
                                                std::optional<uint64_t> fault_page) {
  const GuestRegion region = layout.regions()[region_index];  // copy: a REMAP may rebuild layout
  const uint64_t page = region.page_size;
  bool fault_page_installed = !fault_page.has_value();

  // Walks the window page by page, grouping pages that need installing and share a content kind
  // into pieces; each piece is one install.
  // The source extent around the last page looked at; length 0 until one is found (a plain
  // value rather than an optional, which g++ 12 misjudges as maybe uninitialised here).
  Extent extent{.length = 0};
  uint64_t piece_start = 0;
  uint64_t piece_length = 0;
  ContentKind piece_kind = ContentKind::kData;
  auto flush = [&]() -> Result<Step> {
    if (piece_length == 0) return Step::kDone;
    const uint64_t start = piece_start;
    const uint64_t length = std::exchange(piece_length, 0);
    auto step = InstallPiece(region, start, length, piece_kind);
    const bool has_fault = fault_page && *fault_page >= start && *fault_page < start + length;
    if (!step) {
      if (!has_fault) {
        // A neighbour fetched speculatively: leave it for its own fault.
        Log(LogLevel::kDebug,
            Where(region, start) + ": fault-around skipped: " + step.error().ToString());
        return Step::kDone;
      }
      if (step.error().code() == ErrorCode::kPeerGone) return std::move(step).error();
      return Poison(region, *fault_page, step.error());
    }
    if (has_fault && *step == Step::kDone) fault_page_installed = true;
    return step;
  };

  for (uint64_t offset = begin; offset < end; offset += page) {
    const uint64_t file_offset = region.file_offset.value() + offset;
    const PageState state = StateOf(file_offset);
    const bool is_fault_page = fault_page && *fault_page == offset;
    // The faulting page is installed even if the map says it is: the map can be stale (a
    // MADV_DONTNEED whose REMOVE event was not asked for). EEXIST then settles it cheaply.
    const bool needed = is_fault_page || state == kNotInstalled || state == kZeroOnFault;
    const ContentKind zero = write_fault ? ContentKind::kZeroToWrite : ContentKind::kZero;
    ContentKind kind = zero;
    if (needed && state != kZeroOnFault) {
      if (extent.length == 0 || file_offset < extent.offset.value() ||
          file_offset >= extent.offset.value() + extent.length) {
        auto found = source->ExtentAt(FileOffset(file_offset));
        extent = found ? *found : Extent{.length = 0};
        if (!found) kind = ContentKind::kData;  // let the read report the error
      }
      if (extent.length != 0) {
        // A huge page is data if any part of it is.
        const bool all_zero = extent.kind == ExtentKind::kZero &&
                              extent.offset.value() + extent.length >= file_offset + page;
        kind = all_zero ? zero : ContentKind::kData;
      }
    }
    if (!needed || (piece_length > 0 && kind != piece_kind)) {
      GM_ASSIGN_OR_RETURN(Step step, flush());
      if (step == Step::kRetryAfterDrain) return step;
    }
    if (needed) {
      if (piece_length == 0) {
        piece_start = offset;
        piece_kind = kind;
      }
      piece_length += page;
    }
  }
  GM_ASSIGN_OR_RETURN(Step step, flush());
  if (step == Step::kRetryAfterDrain) return step;
  if (!fault_page_installed) {
    // It was installed before this fault was served (EEXIST): wake the thread that waits on it.
    GM_RETURN_IF_ERROR(uffd.Wake(region.host_addr.UncheckedAdd(*fault_page), page));
  }
  return Step::kDone;
}

Result<Step> FaultHandler::State::InstallPiece(const GuestRegion& region, uint64_t offset,
                                               uint64_t length, ContentKind kind) {
  return options.mode == InstallMode::kCopy ? InstallPieceByCopy(region, offset, length, kind)
                                            : InstallPieceInFile(region, offset, length, kind);
}

template <typename InstallOne>
Result<Step> FaultHandler::State::Settle(const Result<UffdProgress>& progress,
                                         const GuestRegion& region, uint64_t offset,
                                         uint64_t length, std::atomic<uint64_t>& counter,
                                         InstallOne install_one) {
  if (!progress) return progress.error();
  const uint64_t file_offset = region.file_offset.value() + offset;
  const uint64_t done = std::min<uint64_t>(
      AlignDown(static_cast<uint64_t>(std::max<int64_t>(progress->bytes, 0)), region.page_size),
      length);
  switch (progress->outcome) {
    case UffdProgress::Outcome::kDone:
      SetState(file_offset, length, kInstalled);
      Add(counter, length / kPageSize4K);
      return Step::kDone;
    case UffdProgress::Outcome::kTaskGone:
      return Error(ErrorCode::kPeerGone, options.name + ": the VM's process has exited");
    case UffdProgress::Outcome::kAgain:
      SetState(file_offset, done, kInstalled);
      Add(counter, done / kPageSize4K);
      return Step::kRetryAfterDrain;
    case UffdProgress::Outcome::kExists:
      break;
  }
  // Some page in the piece is already mapped: install the rest one page at a time.
  SetState(file_offset, done, kInstalled);
  Add(counter, done / kPageSize4K);
  for (uint64_t at = offset + done; at < offset + length; at += region.page_size) {
    Result<UffdProgress> one = install_one(at);
    if (!one) return one.error();
    switch (one->outcome) {
      case UffdProgress::Outcome::kDone:
        Add(counter, region.page_size / kPageSize4K);
        [[fallthrough]];
      case UffdProgress::Outcome::kExists:
        SetState(region.file_offset.value() + at, region.page_size, kInstalled);
        break;
      case UffdProgress::Outcome::kAgain:
        return Step::kRetryAfterDrain;
      case UffdProgress::Outcome::kTaskGone:
        return Error(ErrorCode::kPeerGone, options.name + ": the VM's process has exited");
    }
  }
  return Step::kDone;
}

Result<Step> FaultHandler::State::InstallPieceByCopy(const GuestRegion& region, uint64_t offset,
                                                     uint64_t length, ContentKind kind) {
  const HostVirtAddr host = region.host_addr.UncheckedAdd(offset);
  if (kind == ContentKind::kData) {
    const FileOffset from(region.file_offset.value() + offset);
    GM_RETURN_IF_ERROR(source->ReadAt(from, buffer.span().first(length)));
    Add(counters.bytes_read, length);
    auto one = [&](uint64_t at) {
      return uffd.Copy(region.host_addr.UncheckedAdd(at), buffer.bytes() + (at - offset),
                       region.page_size);
    };
    return Settle(uffd.Copy(host, buffer.data(), length), region, offset, length,
                  counters.pages_copied, one);
  }
  if (kind == ContentKind::kZeroToWrite && length <= zero_page.size()) {
    auto one = [&](uint64_t at) {
      return uffd.Copy(region.host_addr.UncheckedAdd(at), zero_page.data(), region.page_size);
    };
    return Settle(uffd.Copy(host, zero_page.data(), length), region, offset, length,
                  counters.pages_zeroed, one);
  }
  if (region.page_size == kPageSize4K) {
    auto one = [&](uint64_t at) {
      return uffd.ZeroPage(region.host_addr.UncheckedAdd(at), kPageSize4K);
    };
    return Settle(uffd.ZeroPage(host, length), region, offset, length, counters.pages_zeroed, one);
  }
  // hugetlb has no UFFDIO_ZEROPAGE: copy the shared zero page, one huge page at a time.
  auto one = [&](uint64_t at) {
    return uffd.Copy(region.host_addr.UncheckedAdd(at), zero_page.data(), kHugePageSize2M);
  };
  return Settle(one(offset), region, offset, kHugePageSize2M, counters.pages_zeroed, one);
}

Result<Step> FaultHandler::State::InstallPieceInFile(const GuestRegion& region, uint64_t offset,
                                                     uint64_t length, ContentKind kind) {
  MemoryFile& file = *options.memory_file;
  const uint64_t page = region.page_size;
  auto continue_one = [&](uint64_t at) {
    return uffd.Continue(region.host_addr.UncheckedAdd(at), page);
  };
  // Split by whether the file already holds the content (prepared): those pages are only
  // continued; the others get their content written first.
  for (uint64_t run = offset; run < offset + length;) {
    const uint64_t file_offset = region.file_offset.value() + run;
    const bool prepared = file.StateAt(FileOffset(file_offset)) == PageState::kPrepared;
    uint64_t run_end = run + page;
    while (run_end < offset + length &&
           (file.StateAt(FileOffset(region.file_offset.value() + run_end)) ==
            PageState::kPrepared) == prepared) {
      run_end += page;
    }
    const uint64_t run_length = run_end - run;
    const HostVirtAddr host = region.host_addr.UncheckedAdd(run);
    std::atomic<uint64_t>* counter = &counters.pages_continued;
    if (!prepared) {
      if (kind != ContentKind::kData && page == kPageSize4K) {
        // A zero page straight into the file's page cache and the mapping: nothing copied.
        auto zero_one = [&](uint64_t at) {
          return uffd.ZeroPage(region.host_addr.UncheckedAdd(at), kPageSize4K);
        };
        GM_ASSIGN_OR_RETURN(Step step, Settle(uffd.ZeroPage(host, run_length), region, run,
                                              run_length, counters.pages_zeroed, zero_one));
        if (step != Step::kDone) return step;
        auto marked = file.MarkPrepared(FileOffset(file_offset), run_length);
        (void)marked;  // pages another writer prepared meanwhile are prepared all the same
        // Pages that were already in the file (EEXIST above) still need mapping.
        GM_ASSIGN_OR_RETURN(step, Settle(uffd.Continue(host, run_length), region, run, run_length,
                                         counters.pages_continued, continue_one));
        if (step != Step::kDone) return step;
        run = run_end;
        continue;
      }
      std::span<const std::byte> content;
      if (kind == ContentKind::kData) {
        GM_RETURN_IF_ERROR(
            source->ReadAt(FileOffset(file_offset), buffer.span().first(run_length)));
        Add(counters.bytes_read, run_length);
        content = buffer.span().first(run_length);
      } else {
        content = zero_page.span().first(run_length);  // huge pages: one at a time
      }
      auto populated = file.Populate(FileOffset(file_offset), content);
      if (!populated && populated.error().code() != ErrorCode::kAlreadyExists) {
        return std::move(populated).error();
      }
    }
    GM_ASSIGN_OR_RETURN(Step step, Settle(uffd.Continue(host, run_length), region, run, run_length,
                                          *counter, continue_one));
    if (step != Step::kDone) return step;
    run = run_end;
  }
  return Step::kDone;
}

Result<Step> FaultHandler::State::Poison(const GuestRegion& region, uint64_t page_offset,
                                         const Error& why) {
  const HostVirtAddr host = region.host_addr.UncheckedAdd(page_offset);
  auto poisoned = uffd.Poison(host, region.page_size);
  if (poisoned && poisoned->outcome == UffdProgress::Outcome::kDone) {
    SetState(region.file_offset.value() + page_offset, region.page_size, kInstalled);
    Add(counters.pages_poisoned, region.page_size / kPageSize4K);
    Log(LogLevel::kError,
        Where(region, page_offset) + " poisoned (the VM gets SIGBUS there): " + why.ToString());
    return Step::kDone;
  }
  if (poisoned && poisoned->outcome == UffdProgress::Outcome::kAgain) return Step::kRetryAfterDrain;
  if (poisoned && poisoned->outcome == UffdProgress::Outcome::kTaskGone) {
    return Error(ErrorCode::kPeerGone, options.name + ": the VM's process has exited");
  }
  // No UFFDIO_POISON on this uffd: never install zeros where data was expected. Fail the VM.
  Log(LogLevel::kError,
      Where(region, page_offset) +
          " cannot be served and cannot be poisoned; giving up the VM: " + why.ToString());
  return Error(why.code(), Where(region, page_offset) + ": " + why.context(), why.sys_errno());
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
  if (events_remove + events_unmap + events_remap + events_fork > 0) {
    out += "; events: remove " + std::to_string(events_remove) + ", unmap " +
           std::to_string(events_unmap) + ", remap " + std::to_string(events_remap) + ", fork " +
           std::to_string(events_fork);
  }
  if (eagain_retries > 0) out += "; eagain retries " + std::to_string(eagain_retries);
  if (fault_all_us > 0) out += "; fault-all " + std::to_string(fault_all_us) + "us";
  return out;
}

}  // namespace guestmem
