#include "sim/workload.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <latch>
#include <thread>
#include <utility>

#include "base/hex.h"
#include "guestmem/os.h"
#include "sim/random.h"

namespace guestmem::sim {
namespace {

using Clock = std::chrono::steady_clock;

Error Invalid(const std::string& what) {
  return Error(ErrorCode::kInvalidArgument, "workload: " + what);
}

// --- planning ----------------------------------------------------------------------------------

// Decides read or write for one generated access.
class AccessChooser {
 public:
  AccessChooser(AccessMode mode, uint64_t seed) : mode_(mode), rng_(seed ^ 0x6d697865644d6f64ULL) {}
  bool NextIsWrite() {
    switch (mode_) {
      case AccessMode::kRead:
        return false;
      case AccessMode::kWrite:
        return true;
      case AccessMode::kMixed:
        return (rng_.Next() >> 63) != 0;
    }
    return false;
  }

 private:
  AccessMode mode_;
  SplitMix64 rng_;
};

void PlanSequential(const WorkloadSpec& spec, uint64_t total_pages, WorkloadPlan& plan) {
  const uint64_t pages = spec.pages == 0 ? total_pages : std::min(spec.pages, total_pages);
  AccessChooser chooser(spec.access, spec.seed);
  const uint64_t threads = plan.threads.size();
  for (uint64_t t = 0; t < threads; ++t) {
    const uint64_t begin = pages * t / threads;
    const uint64_t end = pages * (t + 1) / threads;
    for (uint64_t p = begin; p < end; ++p) {
      plan.threads[t].push_back(Access{p * kAccessBytes, chooser.NextIsWrite()});
    }
  }
}

void PlanRandom(const WorkloadSpec& spec, uint64_t total_pages, WorkloadPlan& plan) {
  const uint64_t accesses = spec.pages == 0 ? total_pages : spec.pages;
  SplitMix64 rng(spec.seed);
  AccessChooser chooser(spec.access, spec.seed);
  for (uint64_t i = 0; i < accesses; ++i) {
    const uint64_t page = rng.Below(total_pages);
    plan.threads[page % plan.threads.size()].push_back(
        Access{page * kAccessBytes, chooser.NextIsWrite()});
  }
}

// Runs of 1-8 pages separated by gaps of at least one page, sized so that the runs cover the
// wanted fraction of memory on average; then the runs in random order, dealt round-robin.
void PlanSparse(const WorkloadSpec& spec, uint64_t total_pages, WorkloadPlan& plan) {
  constexpr uint64_t kMaxRun = 8;
  constexpr double kMeanRun = (1 + kMaxRun) / 2.0;
  const double density =
      spec.pages == 0
          ? 0.1
          : std::min(1.0, static_cast<double>(spec.pages) / static_cast<double>(total_pages));
  const double mean_gap = kMeanRun * (1 / density - 1);
  const uint64_t max_gap = std::max<uint64_t>(1, static_cast<uint64_t>(2 * mean_gap - 1 + 0.5));
  const uint64_t budget = spec.pages == 0 ? total_pages : spec.pages;
  SplitMix64 rng(spec.seed);
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // first page, length
  uint64_t in_runs = 0;
  for (uint64_t page = rng.Between(0, max_gap); page < total_pages && in_runs < budget;) {
    uint64_t length = std::min({rng.Between(1, kMaxRun), total_pages - page, budget - in_runs});
    runs.emplace_back(page, length);
    in_runs += length;
    page += length + rng.Between(1, max_gap);
  }
  for (size_t i = runs.size(); i > 1; --i) std::swap(runs[i - 1], runs[rng.Below(i)]);
  AccessChooser chooser(spec.access, spec.seed);
  for (size_t i = 0; i < runs.size(); ++i) {
    auto& list = plan.threads[i % plan.threads.size()];
    for (uint64_t p = runs[i].first; p < runs[i].first + runs[i].second; ++p) {
      list.push_back(Access{p * kAccessBytes, chooser.NextIsWrite()});
    }
  }
}

Status PlanTrace(const WorkloadSpec& spec, uint64_t memory_bytes, WorkloadPlan& plan) {
  if (spec.trace.empty()) return Invalid("the trace holds no accesses");
  for (const TraceAccess& a : spec.trace) {
    if (a.offset >= memory_bytes) {
      return Invalid("trace line " + std::to_string(a.line) + ": offset " + Hex(a.offset) +
                     " is beyond guest memory of " + Hex(memory_bytes) + " bytes");
    }
    const uint64_t page = a.offset / kAccessBytes;
    plan.threads[page % plan.threads.size()].push_back(Access{page * kAccessBytes, a.write});
  }
  return OkStatus();
}

// --- running -----------------------------------------------------------------------------------

constexpr uint8_t kTouched = 1;
constexpr uint8_t kWritten = 2;

struct ThreadOutcome {
  Status status;
  uint64_t ns = 0;
  uint64_t read = 0;
  uint64_t written = 0;
  uint64_t mismatches = 0;
  std::optional<Mismatch> first;
};

// Compares a guest page with what it must hold; counts and records a difference.
void CheckPage(const std::byte* guest, const std::byte* want, uint64_t offset, bool written,
               ThreadOutcome& out) {
  CompareAccess(guest, want, offset, written, out.mismatches, out.first);
}

Status ReadFilePage(Os* os, int fd, uint64_t offset, std::byte* out) {
  uint64_t done = 0;
  while (done < kAccessBytes) {
    const ssize_t n =
        os->Pread(fd, out + done, kAccessBytes - done, static_cast<off_t>(offset + done));
    if (n == -EINTR) continue;
    if (n < 0)
      return PosixError(static_cast<int>(-n), "verify: pread memory file at " + Hex(offset));
    if (n == 0) {
      return Error(ErrorCode::kDataLoss,
                   "verify: memory file ends inside the page at " + Hex(offset));
    }
    done += static_cast<uint64_t>(n);
  }
  return OkStatus();
}

void RunThread(const GuestVm& vm, const std::vector<Access>& accesses, const RunOptions& options,
               Os* os, std::vector<uint8_t>& page_state, ThreadOutcome& out) {
  alignas(64) std::byte want[kAccessBytes];
  const auto start = Clock::now();
  for (const Access& a : accesses) {
    std::byte* guest = vm.HostAddress(a.offset);
    uint8_t& state = page_state[a.offset / kAccessBytes];
    state |= kTouched;
    if (a.write) {
      FillWritePattern(a.offset, guest);
      state |= kWritten;
      ++out.written;
      if (options.verify) {
        FillWritePattern(a.offset, want);
        CheckPage(guest, want, a.offset, true, out);
      }
      continue;
    }
    ++out.read;
    if (!options.verify) {
      (void)*reinterpret_cast<volatile const uint8_t*>(guest);  // the touch; no copy
      continue;
    }
    const bool written = (state & kWritten) != 0;
    if (written) {
      FillWritePattern(a.offset, want);
    } else if (Status s = ReadFilePage(os, options.mem_file_fd, a.offset, want); !s) {
      out.status = std::move(s);
      break;
    }
    CheckPage(guest, want, a.offset, written, out);
  }
  out.ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
}

Status ValidatePlan(const WorkloadPlan& plan, uint64_t memory_bytes) {
  if (plan.threads.empty()) return Invalid("the plan has no threads");
  for (size_t t = 0; t < plan.threads.size(); ++t) {
    for (size_t i = 0; i < plan.threads[t].size(); ++i) {
      const uint64_t offset = plan.threads[t][i].offset;
      if (!IsAligned(offset, kAccessBytes) || offset >= memory_bytes) {
        return Invalid("thread " + std::to_string(t) + " access " + std::to_string(i) +
                       ": offset " + Hex(offset) + " is not a 4 KiB page of guest memory of " +
                       Hex(memory_bytes) + " bytes");
      }
    }
  }
  return OkStatus();
}

Result<BalloonResult> Balloon(const GuestVm& vm, const BalloonSpec& b, Os* os) {
  BalloonResult result{b.offset, b.length};
  const uint64_t end = b.offset + b.length;
  for (const GuestVmRegion& r : vm.regions()) {
    const uint64_t lo = std::max(b.offset, r.file_offset);
    const uint64_t hi = std::min(end, r.file_offset + r.host.size());
    if (lo >= hi) continue;
    const int advised = os->Madvise(vm.HostAddress(lo), hi - lo, MADV_DONTNEED);
    if (advised < 0) {
      return PosixError(-advised, "balloon: madvise(MADV_DONTNEED) " + Hex(hi - lo) +
                                      " bytes at memory offset " + Hex(lo));
    }
  }
  for (uint64_t offset = b.offset; offset < end; offset += kAccessBytes) {
    const std::byte* guest = vm.HostAddress(offset);
    ++result.pages_checked;
    for (uint64_t i = 0; i < kAccessBytes; ++i) {
      if (guest[i] != std::byte{0}) {
        ++result.nonzero_pages;
        if (!result.first_nonzero) result.first_nonzero = offset + i;
        break;
      }
    }
  }
  return result;
}

}  // namespace

std::string_view WorkloadKindName(WorkloadKind kind) {
  switch (kind) {
    case WorkloadKind::kSequential:
      return "sequential";
    case WorkloadKind::kRandom:
      return "random";
    case WorkloadKind::kSparse:
      return "sparse";
    case WorkloadKind::kTrace:
      return "trace";
  }
  return "?";
}

std::string_view AccessModeName(AccessMode mode) {
  switch (mode) {
    case AccessMode::kRead:
      return "read";
    case AccessMode::kWrite:
      return "write";
    case AccessMode::kMixed:
      return "mixed";
  }
  return "?";
}

Status ValidateBalloon(const BalloonSpec& b, uint64_t memory_bytes, uint64_t page_size) {
  const std::string what = "balloon " + Hex(b.offset) + ":" + Hex(b.length) + ": ";
  if (b.length == 0) return Invalid(what + "empty range");
  if (!IsAligned(b.offset, page_size) || !IsAligned(b.length, page_size)) {
    return Invalid(what + "not aligned to the page size " + Hex(page_size));
  }
  if (b.offset >= memory_bytes || b.length > memory_bytes - b.offset) {
    return Invalid(what + "beyond guest memory of " + Hex(memory_bytes) + " bytes");
  }
  return OkStatus();
}

Result<WorkloadPlan> PlanWorkload(const WorkloadSpec& spec, uint64_t memory_bytes) {
  if (spec.threads == 0) return Invalid("at least one thread is needed");
  if (memory_bytes == 0 || !IsAligned(memory_bytes, kAccessBytes)) {
    return Invalid("guest memory of " + Hex(memory_bytes) +
                   " bytes is not a non-zero multiple of 4 KiB");
  }
  WorkloadPlan plan;
  plan.kind = spec.kind;
  plan.access = spec.access;
  plan.threads.resize(spec.threads);
  const uint64_t total_pages = memory_bytes / kAccessBytes;
  switch (spec.kind) {
    case WorkloadKind::kSequential:
      PlanSequential(spec, total_pages, plan);
      break;
    case WorkloadKind::kRandom:
      PlanRandom(spec, total_pages, plan);
      break;
    case WorkloadKind::kSparse:
      PlanSparse(spec, total_pages, plan);
      break;
    case WorkloadKind::kTrace:
      GM_RETURN_IF_ERROR(PlanTrace(spec, memory_bytes, plan));
      break;
  }
  return plan;
}

void FillWritePattern(uint64_t offset, std::byte* page) {
  for (uint64_t i = 0; i < kAccessBytes; i += sizeof(uint64_t)) {
    const uint64_t word = ((offset + i) * 0x9e3779b97f4a7c15ULL) ^ 0x7772697474656e21ULL;
    std::memcpy(page + i, &word, sizeof(word));
  }
}

Result<WorkloadResult> RunWorkload(const GuestVm& vm, const WorkloadPlan& plan,
                                   const RunOptions& options) {
  Os* os = options.os != nullptr ? options.os : Os::Default();
  GM_RETURN_IF_ERROR(ValidatePlan(plan, vm.memory_bytes()));
  if (options.balloon) {
    GM_RETURN_IF_ERROR(ValidateBalloon(*options.balloon, vm.memory_bytes(), vm.page_size()));
  }
  if (options.verify) {
    if (options.mem_file_fd < 0) return Invalid("verify needs the memory file");
    const off_t size = os->Lseek(options.mem_file_fd, 0, SEEK_END);
    if (size < 0) return PosixError(static_cast<int>(-size), "verify: size of the memory file");
    if (static_cast<uint64_t>(size) < vm.memory_bytes()) {
      return Error(ErrorCode::kDataLoss,
                   "verify: the memory file holds " + Hex(static_cast<uint64_t>(size)) +
                       " bytes, less than guest memory of " + Hex(vm.memory_bytes()));
    }
  }

  const size_t threads = plan.threads.size();
  std::vector<uint8_t> page_state(vm.memory_bytes() / kAccessBytes, 0);
  std::vector<ThreadOutcome> outcomes(threads);
  std::latch ready(static_cast<std::ptrdiff_t>(threads));
  std::latch go(1);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (size_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      ready.count_down();
      go.wait();
      RunThread(vm, plan.threads[t], options, os, page_state, outcomes[t]);
    });
  }
  ready.wait();
  const auto start = Clock::now();
  go.count_down();
  for (std::thread& w : workers) w.join();

  WorkloadResult result;
  result.elapsed_ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
  result.kind = plan.kind;
  result.access = plan.access;
  result.verified = options.verify;
  for (size_t t = 0; t < threads; ++t) {
    ThreadOutcome& o = outcomes[t];
    if (!o.status) return std::move(o.status).error().WithContext("thread " + std::to_string(t));
    result.thread_ns.push_back(o.ns);
    result.pages_touched += o.read + o.written;
    result.pages_read += o.read;
    result.pages_written += o.written;
    result.mismatches += o.mismatches;
    if (o.first) KeepLowest(result.first_mismatch, *o.first);
  }
  result.distinct_pages = static_cast<uint64_t>(
      std::count_if(page_state.begin(), page_state.end(), [](uint8_t s) { return s != 0; }));
  if (options.balloon) {
    GM_ASSIGN_OR_RETURN(result.balloon, Balloon(vm, *options.balloon, os));
  }
  return result;
}

uint64_t WorkloadPlan::accesses() const {
  uint64_t n = 0;
  for (const auto& list : threads) n += list.size();
  return n;
}

uint64_t WorkloadPlan::distinct_pages() const {
  std::vector<uint64_t> pages;
  for (const auto& list : threads) {
    for (const Access& a : list) pages.push_back(a.offset);
  }
  std::sort(pages.begin(), pages.end());
  return static_cast<uint64_t>(std::unique(pages.begin(), pages.end()) - pages.begin());
}

Result<WorkloadKind> ParseWorkloadKind(std::string_view name) {
  for (WorkloadKind kind :
       {WorkloadKind::kSequential, WorkloadKind::kRandom, WorkloadKind::kSparse}) {
    if (WorkloadKindName(kind) == name) return kind;
  }
  return Invalid("unknown workload \"" + std::string(name) +
                 "\" (expected sequential, random or sparse)");
}

Result<AccessMode> ParseAccessMode(std::string_view name) {
  for (AccessMode mode : {AccessMode::kRead, AccessMode::kWrite, AccessMode::kMixed}) {
    if (AccessModeName(mode) == name) return mode;
  }
  return Invalid("unknown access \"" + std::string(name) + "\" (expected read, write or mixed)");
}

nlohmann::json WorkloadResultToJson(const WorkloadResult& r) {
  nlohmann::json j;
  j["workload"] = WorkloadKindName(r.kind);
  j["access"] = AccessModeName(r.access);
  j["threads"] = r.thread_ns.size();
  j["elapsed_ms"] = static_cast<double>(r.elapsed_ns) / 1e6;
  nlohmann::json thread_ms = nlohmann::json::array();
  for (uint64_t ns : r.thread_ns) thread_ms.push_back(static_cast<double>(ns) / 1e6);
  j["thread_ms"] = std::move(thread_ms);
  j["pages_touched"] = r.pages_touched;
  j["distinct_pages"] = r.distinct_pages;
  j["pages_read"] = r.pages_read;
  j["pages_written"] = r.pages_written;
  j["verified"] = r.verified;
  j["mismatches"] = r.mismatches;
  j["first_mismatch"] = nullptr;
  if (r.first_mismatch) {
    j["first_mismatch"] = {{"offset", r.first_mismatch->offset},
                           {"got", r.first_mismatch->got},
                           {"want", r.first_mismatch->want},
                           {"written", r.first_mismatch->written}};
  }
  j["balloon"] = nullptr;
  if (r.balloon) {
    j["balloon"] = {
        {"offset", r.balloon->offset},
        {"length", r.balloon->length},
        {"pages_checked", r.balloon->pages_checked},
        {"nonzero_pages", r.balloon->nonzero_pages},
        {"first_nonzero", r.balloon->first_nonzero ? nlohmann::json(*r.balloon->first_nonzero)
                                                   : nlohmann::json(nullptr)}};
  }
  j["passed"] = r.passed();
  return j;
}

void KeepLowest(std::optional<Mismatch>& lowest, const Mismatch& m) {
  if (!lowest || m.offset < lowest->offset) lowest = m;
}

void CompareAccess(const std::byte* got, const std::byte* want, uint64_t offset, bool written,
                   uint64_t& mismatches, std::optional<Mismatch>& first) {
  if (std::memcmp(got, want, kAccessBytes) == 0) return;
  size_t i = 0;
  while (got[i] == want[i]) ++i;
  ++mismatches;
  KeepLowest(first, Mismatch{offset + i, static_cast<uint8_t>(got[i]),
                             static_cast<uint8_t>(want[i]), written});
}

}  // namespace guestmem::sim
