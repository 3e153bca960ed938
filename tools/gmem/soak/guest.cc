#include "soak/guest.h"

#include <linux/mman.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/hex.h"
#include "guestmem/handshake.h"
#include "guestmem/mapping.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfaultfd.h"
#include "sim/random.h"
#include "soak/content.h"

namespace guestmem::soak {
namespace {

using sim::SplitMix64;

constexpr uint64_t kEpochOperations = 256;  // the focus moves after this many operations
constexpr uint64_t kFocusWindows = 4;       // 64 KiB windows the workers share at a time
constexpr uint64_t kChunkPages = 8;         // 4 KiB pages one thread owns in a row
constexpr uint64_t kForkCheckUnits = 256;   // pages a forked child checks
constexpr unsigned kMainThread = kMaxVmThreads;

// --- guarded access to guest memory ------------------------------------------------------------
// A SIGBUS or SIGSEGV during a guarded access jumps back to it; anywhere else it kills the VM.

enum class Outcome { kOk, kSigbus, kSigsegv };

// Volatile: the compiler must not drop or move the stores around a guarded loop, which reads
// nothing else the handler writes.
thread_local sigjmp_buf* volatile t_guard = nullptr;
thread_local volatile int t_signal = 0;

// After a jump out of the handler: a sanitizer's own handler may have run ours with the signal
// blocked, and nothing restores the mask on the way out.
void UnblockMemorySignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGBUS);
  sigaddset(&set, SIGSEGV);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

Outcome Caught() {
  UnblockMemorySignals();
  return t_signal == SIGBUS ? Outcome::kSigbus : Outcome::kSigsegv;
}

// Ends the VM process at once, without the C library's or a sanitizer's exit work: its other
// threads are still running (ThreadSanitizer would call them leaked and change the exit code).
[[noreturn]] void ExitNow(int code) {
  syscall(SYS_exit_group, code);
  __builtin_unreachable();
}

void OnMemorySignal(int sig, siginfo_t*, void*) {
  sigjmp_buf* guard = t_guard;
  if (guard != nullptr) {
    t_guard = nullptr;
    t_signal = sig;
    siglongjmp(*guard, 1);
  }
  // Not a guarded access: the access repeats and takes the default action.
  signal(sig, SIG_DFL);
}

Status InstallSignalHandlers() {
  struct sigaction sa {};
  sa.sa_sigaction = OnMemorySignal;
  // SA_NODEFER: the handler leaves by siglongjmp without restoring a signal mask, so it must not
  // block the signal it handles.
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGBUS, SIGSEGV}) {
    if (sigaction(sig, &sa, nullptr) != 0) return PosixError(errno, "sigaction");
  }
  return OkStatus();
}

// What a unit must hold, word by word.
struct Expected {
  uint32_t state = kSnapshot;
  uint64_t first_page = 0;  // file page of the unit's first 4 KiB page
  uint64_t seed = 0;
  uint64_t unit = 0;
};

struct Mismatch {
  bool found = false;
  uint64_t word = 0;  // index into the unit
  uint64_t expected = 0;
  uint64_t actual = 0;
};

// Compares `pages` 4 KiB pages at `at` with `e`; the first difference goes to *out.
__attribute__((noinline)) Outcome CheckUnit(const uint8_t* at, uint64_t pages, const Expected& e,
                                            Mismatch* out) {
  sigjmp_buf guard;
  if (sigsetjmp(guard, 0) != 0) return Caught();
  t_guard = &guard;
  const volatile uint64_t* words = reinterpret_cast<const volatile uint64_t*>(at);
  for (uint64_t p = 0; p < pages; ++p) {
    const uint64_t page = e.first_page + p;
    const volatile uint64_t* w = words + p * kWordsPerPage;
    for (uint64_t i = 0; i < kWordsPerPage; ++i) {
      uint64_t want = 0;
      if (e.state == kSnapshot) {
        want = InitialWord(page, i);
      } else if (e.state >= kFirstGeneration) {
        want = PatternWord(e.seed, e.unit, e.state, p * kWordsPerPage + i);
      }
      const uint64_t got = w[i];
      if (got != want) {
        t_guard = nullptr;
        *out = Mismatch{true, p * kWordsPerPage + i, want, got};
        return Outcome::kOk;
      }
    }
  }
  t_guard = nullptr;
  return Outcome::kOk;
}

// Fills the unit at `at` with the pattern of `generation`.
__attribute__((noinline)) Outcome FillUnit(uint8_t* at, uint64_t pages, uint64_t seed,
                                           uint64_t unit, uint32_t generation) {
  sigjmp_buf guard;
  if (sigsetjmp(guard, 0) != 0) return Caught();
  t_guard = &guard;
  volatile uint64_t* words = reinterpret_cast<volatile uint64_t*>(at);
  for (uint64_t i = 0; i < pages * kWordsPerPage; ++i) {
    words[i] = PatternWord(seed, unit, generation, i);
  }
  t_guard = nullptr;
  return Outcome::kOk;
}

// What a 4 KiB page holds, for failure messages: "all zero", "the snapshot's data", ...
__attribute__((noinline)) std::string DescribeContent(const uint8_t* page_at, uint64_t page) {
  uint64_t words[kWordsPerPage];
  {
    sigjmp_buf guard;
    if (sigsetjmp(guard, 0) != 0) {
      UnblockMemorySignals();
      return "(unreadable now)";
    }
    t_guard = &guard;
    const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(page_at);
    for (uint64_t i = 0; i < kWordsPerPage; ++i) words[i] = w[i];
    t_guard = nullptr;
  }
  bool zero = true;
  bool snapshot = true;
  for (uint64_t i = 0; i < kWordsPerPage; ++i) {
    zero = zero && words[i] == 0;
    snapshot = snapshot && words[i] == SnapshotWord(page, i);
  }
  if (zero) return "all zero";
  if (snapshot) return "exactly the snapshot's data";
  return "neither zero nor the snapshot's data";
}

struct Region {
  uint8_t* host = nullptr;
  uint64_t size = 0;
  uint64_t file_offset = 0;
};

class Guest {
 public:
  Guest(const GuestSpec& spec, VmSlot* slot)
      : spec_(spec),
        slot_(slot),
        unit_bytes_(spec.page_size),
        pages_per_unit_(spec.page_size / kPageSize4K),
        units_(spec.memory_bytes / spec.page_size),
        chunk_units_(spec.page_size == kPageSize4K ? kChunkPages : 1),
        window_units_(spec.page_size == kPageSize4K ? kWindowPages : 1),
        focus_units_(kFocusWindows * window_units_),
        state_(new std::atomic<uint32_t>[units_]),
        unmapped_(new std::atomic<uint8_t>[units_]) {
    for (uint64_t u = 0; u < units_; ++u) {
      state_[u].store(kSnapshot, std::memory_order_relaxed);
      unmapped_[u].store(0, std::memory_order_relaxed);
    }
  }

  int Run();

 private:
  Status MapMemory();
  Status HandOver();
  void Worker(unsigned t);
  void MainThread();

  // Operations; each records a failure and exits the VM on a wrong byte.
  void Read(uint64_t unit, const char* what);
  void Write(uint64_t unit);
  void Balloon(uint64_t chunk, SplitMix64& rng);
  void Munmap(SplitMix64& rng);
  void Fork();
  [[noreturn]] void CheckForkedCopy();

  std::optional<uint64_t> PickChunk(unsigned t, SplitMix64& rng) const;
  uint64_t FocusFirstUnit() const;
  uint8_t* UnitAddress(uint64_t unit) const;
  bool Unmapped(uint64_t unit) const { return unmapped_[unit].load() != 0; }
  bool UnitFails(uint64_t unit) const {
    for (uint64_t p = 0; p < pages_per_unit_; ++p) {
      if (IsFailingPage(unit * pages_per_unit_ + p, spec_.failing_permille)) return true;
    }
    return false;
  }
  // The source cannot supply this unit's content, and the unit still wants it: SIGBUS.
  bool ExpectsSigbus(uint64_t unit, uint32_t state) const {
    return state == kSnapshot && spec_.failing_permille != 0 && UnitFails(unit);
  }
  bool Hole(uint64_t unit) const {
    for (uint64_t p = 0; p < pages_per_unit_; ++p) {
      if (!IsHolePage(unit * pages_per_unit_ + p)) return false;
    }
    return true;
  }

  std::string Where(uint64_t unit) const;
  [[noreturn]] void Fail(const std::string& what);
  [[noreturn]] void FailMismatch(uint64_t unit, uint32_t state, const char* what,
                                 const Mismatch& m);
  [[noreturn]] void FailSignal(uint64_t unit, uint32_t state, const char* what, Outcome outcome);

  void Doing(unsigned thread, VmOp op, uint64_t unit = 0) {
    slot_->doing[thread].op.store(static_cast<uint32_t>(op), std::memory_order_relaxed);
    slot_->doing[thread].unit.store(unit, std::memory_order_relaxed);
  }
  void Progress() { slot_->progress.fetch_add(1, std::memory_order_relaxed); }

  const GuestSpec spec_;
  VmSlot* const slot_;
  const uint64_t unit_bytes_;
  const uint64_t pages_per_unit_;
  const uint64_t units_;
  const uint64_t chunk_units_;
  const uint64_t window_units_;
  const uint64_t focus_units_;
  std::unique_ptr<std::atomic<uint32_t>[]> state_;    // UnitState per unit; written by its owner
  std::unique_ptr<std::atomic<uint8_t>[]> unmapped_;  // set before the munmap

  Mapping reservation_;  // every region and the gaps between them
  std::vector<Region> regions_;
  std::optional<Userfaultfd> uffd_;
  UniqueFd socket_;
  bool fork_events_ = false;
  uint64_t unmapped_units_ = 0;  // main thread only

  std::atomic<uint64_t> operations_{0};  // started, in all workers
  std::atomic<bool> storm_{false};
  std::atomic<bool> pause_requested_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool pause_ = false;    // GUARDED_BY(mu_)
  unsigned paused_ = 0;   // GUARDED_BY(mu_)
  unsigned running_ = 0;  // GUARDED_BY(mu_)
};

std::string Guest::Where(uint64_t unit) const {
  return "vm " + std::to_string(spec_.index) + " (pid " + std::to_string(getpid()) + ") page " +
         Hex(unit) + (unit_bytes_ == kPageSize4K ? "" : " (2 MiB)") + " at memory file offset " +
         Hex(unit * unit_bytes_) + ", host " + Hex(reinterpret_cast<uint64_t>(UnitAddress(unit)));
}

void Guest::Fail(const std::string& what) {
  slot_->Fail(what);
  ExitNow(kGuestExitFailed);
}

void Guest::FailMismatch(uint64_t unit, uint32_t state, const char* what, const Mismatch& m) {
  uint64_t byte = 0;
  while (byte < 7 && ((m.expected >> (8 * byte)) & 0xff) == ((m.actual >> (8 * byte)) & 0xff)) {
    ++byte;
  }
  const uint64_t offset = m.word * sizeof(uint64_t) + byte;  // in the unit
  const uint64_t page = unit * pages_per_unit_ + offset / kPageSize4K;
  char bytes[64];
  std::snprintf(bytes, sizeof(bytes), "expected 0x%02x, got 0x%02x",
                static_cast<unsigned>((m.expected >> (8 * byte)) & 0xff),
                static_cast<unsigned>((m.actual >> (8 * byte)) & 0xff));
  Fail("wrong byte: " + Where(unit) + ", offset " + Hex(offset) + " (" + what + "): " + bytes +
       "; the page should hold " + DescribeState(state, IsHolePage(page)) + ", it holds " +
       DescribeContent(UnitAddress(unit) + (offset / kPageSize4K) * kPageSize4K, page));
}

void Guest::FailSignal(uint64_t unit, uint32_t state, const char* what, Outcome outcome) {
  const std::string reason =
      outcome == Outcome::kSigbus
          ? std::string(spec_.failing_permille != 0 && UnitFails(unit)
                            ? "the source cannot supply it, but the page should hold "
                            : "the source can supply it; the page should hold ") +
                DescribeState(state, Hole(unit))
          : "the VM never unmapped it";
  Fail(std::string(outcome == Outcome::kSigbus ? "SIGBUS" : "SIGSEGV") + " on " + Where(unit) +
       " (" + what + "): " + reason);
}

uint8_t* Guest::UnitAddress(uint64_t unit) const {
  const uint64_t offset = unit * unit_bytes_;
  for (const Region& r : regions_) {
    if (offset >= r.file_offset && offset < r.file_offset + r.size) {
      return r.host + (offset - r.file_offset);
    }
  }
  return nullptr;
}

Status Guest::MapMemory() {
  const bool huge = spec_.page_size == kHugePageSize2M;
  // Region boundaries fall on 64 KiB (or huge page) multiples, so no fault-around window and no
  // run of pages one thread owns crosses one.
  const uint64_t align = std::max<uint64_t>(kWindowPages * kPageSize4K, spec_.page_size);
  const uint64_t slots = spec_.memory_bytes / align;
  const uint64_t count = std::clamp<uint64_t>(spec_.regions, 1, slots);
  SplitMix64 rng(spec_.seed ^ 0x4e610115ULL);
  std::vector<uint64_t> cuts;
  while (cuts.size() + 1 < count) {
    const uint64_t cut = rng.Between(1, slots - 1) * align;
    if (std::find(cuts.begin(), cuts.end(), cut) == cuts.end()) cuts.push_back(cut);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.push_back(spec_.memory_bytes);

  const uint64_t span = spec_.memory_bytes + spec_.region_gap * (count - 1) + spec_.page_size;
  GM_ASSIGN_OR_RETURN(
      reservation_,
      Mapping::Map(span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  const uint64_t base = *AlignUp(reservation_.address(), spec_.page_size);

  // The uffd exactly as Firecracker makes it: non-blocking, close-on-exec, EVENT_REMOVE, faults
  // taken in the kernel trap too. EVENT_FORK only for the fork injection.
  UffdOptions options;
  options.required_features = kUffdFeatureEventRemove;
  if (spec_.fork) options.optional_features = kUffdFeatureEventFork;
  options.non_blocking = true;
  options.user_mode_only = false;
  GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Create(options));
  fork_events_ = uffd.HasFeature(kUffdFeatureEventFork);
  uffd_.emplace(std::move(uffd));

  uint64_t offset = 0;
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t size = cuts[i] - offset;
    void* want = reinterpret_cast<void*>(base + offset + spec_.region_gap * i);
    const int flags = MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
                      (huge ? MAP_HUGETLB | MAP_HUGE_2MB : 0);
    void* got = mmap(want, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (got == MAP_FAILED) {
      return PosixError(errno, "mmap region " + std::to_string(i) + " of " + Hex(size) + " bytes");
    }
    GM_RETURN_IF_ERROR(
        uffd_->Register(HostVirtAddr(reinterpret_cast<uint64_t>(got)), size, UffdModes::kMissing));
    regions_.push_back(Region{static_cast<uint8_t*>(got), size, offset});
    offset += size;
  }
  return OkStatus();
}

Status Guest::HandOver() {
  std::vector<HandshakeRegion> handshake;
  for (const Region& r : regions_) {
    HandshakeRegion h;
    h.base_host_virt_addr = reinterpret_cast<uint64_t>(r.host);
    h.size = r.size;
    h.offset = r.file_offset;
    h.page_size = spec_.page_size;
    h.page_size_kib = spec_.page_size;  // deprecated, and in bytes, as Firecracker sends it
    handshake.push_back(h);
  }
  GM_ASSIGN_OR_RETURN(socket_, ConnectUnix(spec_.socket_path));
  const int fds[] = {uffd_->fd()};
  GM_RETURN_IF_ERROR(SendHandshake(socket_.get(), handshake, fds));
  slot_->handed_over.store(1);
  return OkStatus();
}

uint64_t Guest::FocusFirstUnit() const {
  const uint64_t epoch = operations_.load(std::memory_order_relaxed) / kEpochOperations;
  const uint64_t focuses = units_ / focus_units_;
  return Mix64(spec_.seed ^ (epoch * 0x9e3779b97f4a7c15ULL)) % focuses * focus_units_;
}

std::optional<uint64_t> Guest::PickChunk(unsigned t, SplitMix64& rng) const {
  const uint64_t threads = spec_.threads;
  const uint64_t first = FocusFirstUnit() / chunk_units_;
  uint64_t own[64];
  size_t n = 0;
  for (uint64_t c = first; c < first + focus_units_ / chunk_units_ && n < 64; ++c) {
    if (c % threads == t && !Unmapped(c * chunk_units_)) own[n++] = c;
  }
  if (n > 0) return own[rng.Below(n)];
  // Nothing of this thread's in the focus: anywhere in memory.
  const uint64_t chunks = units_ / chunk_units_;
  for (int tries = 0; tries < 16; ++tries) {
    const uint64_t c = rng.Below(chunks) / threads * threads + t;
    if (c < chunks && !Unmapped(c * chunk_units_)) return c;
  }
  return std::nullopt;
}

void Guest::Read(uint64_t unit, const char* what) {
  const uint32_t state = state_[unit].load(std::memory_order_relaxed);
  Mismatch m;
  const Outcome outcome = CheckUnit(UnitAddress(unit), pages_per_unit_,
                                    Expected{state, unit * pages_per_unit_, spec_.seed, unit}, &m);
  switch (outcome) {
    case Outcome::kOk:
      if (ExpectsSigbus(unit, state)) {
        Fail("no SIGBUS on " + Where(unit) + " (" + what +
             "): the source cannot supply it, yet it reads " +
             DescribeContent(UnitAddress(unit), unit * pages_per_unit_));
      }
      if (m.found) FailMismatch(unit, state, what, m);
      slot_->bytes_verified.fetch_add(unit_bytes_, std::memory_order_relaxed);
      return;
    case Outcome::kSigbus:
      if (!ExpectsSigbus(unit, state)) FailSignal(unit, state, what, outcome);
      slot_->sigbus.fetch_add(1, std::memory_order_relaxed);
      return;
    case Outcome::kSigsegv:
      if (!Unmapped(unit)) FailSignal(unit, state, what, outcome);
      slot_->sigsegv.fetch_add(1, std::memory_order_relaxed);
      return;
  }
}

void Guest::Write(uint64_t unit) {
  const uint32_t state = state_[unit].load(std::memory_order_relaxed);
  uint32_t generation = state >= kFirstGeneration ? state + 1 : kFirstGeneration;
  if (generation < kFirstGeneration) generation = kFirstGeneration;  // wrapped
  const Outcome outcome =
      FillUnit(UnitAddress(unit), pages_per_unit_, spec_.seed, unit, generation);
  switch (outcome) {
    case Outcome::kOk:
      if (ExpectsSigbus(unit, state)) {
        Fail("no SIGBUS on " + Where(unit) +
             " (write): the source cannot supply its content, yet the write went through");
      }
      state_[unit].store(generation, std::memory_order_relaxed);
      Read(unit, "read back after write");
      return;
    case Outcome::kSigbus:
      if (!ExpectsSigbus(unit, state)) FailSignal(unit, state, "write", outcome);
      slot_->sigbus.fetch_add(1, std::memory_order_relaxed);
      return;
    case Outcome::kSigsegv:
      if (!Unmapped(unit)) FailSignal(unit, state, "write", outcome);
      slot_->sigsegv.fetch_add(1, std::memory_order_relaxed);
      return;
  }
}

void Guest::Balloon(uint64_t chunk, SplitMix64& rng) {
  const uint64_t chunk_first = chunk * chunk_units_;
  const uint64_t first = chunk_first + rng.Below(chunk_units_);
  const uint64_t count = 1 + rng.Below(chunk_first + chunk_units_ - first);
  if (madvise(UnitAddress(first), count * unit_bytes_, MADV_DONTNEED) != 0) {
    const int err = errno;
    if (Unmapped(first)) return;  // unmapped meanwhile: the run is gone as a whole
    Fail("balloon: madvise(MADV_DONTNEED) of " + std::to_string(count) + " page(s) at " +
         Where(first) + " failed: " + strerror(err));
  }
  for (uint64_t u = first; u < first + count; ++u) {
    state_[u].store(kZero, std::memory_order_relaxed);
  }
  slot_->balloons.fetch_add(1, std::memory_order_relaxed);
  slot_->balloon_units.fetch_add(count, std::memory_order_relaxed);
  for (uint64_t u = first; u < first + count; ++u) Read(u, "read after balloon");
}

void Guest::Worker(unsigned t) {
  SplitMix64 rng(Mix64(spec_.seed ^ (t + 1) * 0x2545f4914f6cdd1dULL));
  while (slot_->stop.load(std::memory_order_relaxed) == 0) {
    if (pause_requested_.load()) {
      std::unique_lock lock(mu_);
      ++paused_;
      cv_.notify_all();
      cv_.wait(lock, [&] { return !pause_; });
      --paused_;
      continue;
    }
    if (operations_.fetch_add(1, std::memory_order_relaxed) >= spec_.operations) break;
    const std::optional<uint64_t> chunk = PickChunk(t, rng);
    if (!chunk) {
      Progress();
      continue;
    }
    const uint64_t r = rng.Below(100);
    const bool storm = storm_.load(std::memory_order_relaxed);
    const uint64_t unit = *chunk * chunk_units_ + rng.Below(chunk_units_);
    if (spec_.balloon && r < (storm ? 50u : 10u)) {
      Doing(t, VmOp::kBalloon, unit);
      Balloon(*chunk, rng);
    } else if (r >= (storm ? 85u : 70u)) {
      Doing(t, VmOp::kWrite, unit);
      Write(unit);
    } else {
      Doing(t, VmOp::kRead, unit);
      Read(unit, "read");
    }
    Progress();
  }
  Doing(t, VmOp::kDone);
  std::lock_guard lock(mu_);
  --running_;
  cv_.notify_all();
}

void Guest::Munmap(SplitMix64& rng) {
  if ((unmapped_units_ + window_units_) * 8 > units_) return;  // at most an eighth of memory
  const uint64_t first = FocusFirstUnit() + rng.Below(focus_units_ / window_units_) * window_units_;
  if (Unmapped(first)) return;
  Doing(kMainThread, VmOp::kMunmap, first);
  // Marked first: a worker whose access meets the unmapped range finds it marked.
  for (uint64_t u = first; u < first + window_units_; ++u) unmapped_[u].store(1);
  void* const at = UnitAddress(first);
  const uint64_t length = window_units_ * unit_bytes_;
  if (munmap(at, length) != 0) {
    Fail("munmap of " + Hex(length) + " bytes at " + Where(first) + " failed: " + strerror(errno));
  }
  // The hole is filled with inaccessible memory at once, so that no later mapping of this process
  // lands there and a late access still meets SIGSEGV. It is no uffd's: to the handler the range
  // stays unmapped. The system call itself, not the C library's mmap: a sanitizer would take the
  // new mapping for a write racing the workers' accesses, which are the point of the injection.
  const long guard =
      syscall(SYS_mmap, at, length, PROT_NONE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
  if (guard != static_cast<long>(reinterpret_cast<uintptr_t>(at))) {
    Fail("mapping a guard over the unmapped window at " + Where(first) +
         " failed: " + strerror(errno));
  }
  unmapped_units_ += window_units_;
  slot_->munmaps.fetch_add(1);
  Doing(kMainThread, VmOp::kIdle);
}

void Guest::CheckForkedCopy() {
  // The child: one thread, memory as it was at the fork, faults served through the child's uffd.
  socket_.reset();  // the handler sees the VM hang up when the VM itself exits
  Doing(kMainThread, VmOp::kCheckCopy);
  SplitMix64 rng(Mix64(spec_.seed ^ slot_->forks.load() ^ 0xf02cULL));
  for (uint64_t i = 0; i < kForkCheckUnits; ++i) {
    const uint64_t unit = rng.Below(units_);
    if (Unmapped(unit)) continue;
    slot_->doing[kMainThread].unit.store(unit);
    Read(unit, "check of a forked child's copy");
    Progress();
  }
  ExitNow(kGuestExitOk);
}

void Guest::Fork() {
  if (!fork_events_) return;
  {
    std::unique_lock lock(mu_);
    if (running_ == 0) return;
    pause_ = true;
    pause_requested_.store(true);
    cv_.wait(lock, [&] { return paused_ == running_; });
  }
  Doing(kMainThread, VmOp::kFork);
  const pid_t child = fork();
  if (child == 0) CheckForkedCopy();
  if (child < 0) Fail("vm " + std::to_string(spec_.index) + ": fork: " + strerror(errno));
  int status = 0;
  while (waitpid(child, &status, 0) < 0) {
    if (errno != EINTR) Fail(std::string("waitpid of the forked child: ") + strerror(errno));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == kGuestExitFailed) ExitNow(kGuestExitFailed);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != kGuestExitOk) {
    Fail("vm " + std::to_string(spec_.index) + ": its forked child " + std::to_string(child) +
         (WIFSIGNALED(status) ? " died of signal " + std::to_string(WTERMSIG(status))
                              : " exited " + std::to_string(WEXITSTATUS(status))) +
         " while checking its copy of memory");
  }
  slot_->forks.fetch_add(1);
  Doing(kMainThread, VmOp::kIdle);
  std::lock_guard lock(mu_);
  pause_ = false;
  pause_requested_.store(false);
  cv_.notify_all();
}

void Guest::MainThread() {
  // The injections, at points of the operation budget chosen by the seed.
  enum class Injection { kStormOn, kStormOff, kMunmap, kFork };
  struct Planned {
    uint64_t at;
    Injection what;
  };
  SplitMix64 rng(Mix64(spec_.seed ^ 0x1a7ec7ULL));
  std::vector<Planned> plan;
  const uint64_t ops = spec_.operations;
  auto somewhere = [&] { return ops / 10 + rng.Below(ops * 8 / 10 + 1); };
  if (spec_.balloon) {
    for (int i = 0; i < 3; ++i) {
      const uint64_t at = somewhere();
      plan.push_back({at, Injection::kStormOn});
      plan.push_back({at + ops / 20, Injection::kStormOff});
    }
  }
  if (spec_.munmap) {
    for (int i = 0; i < 3; ++i) plan.push_back({somewhere(), Injection::kMunmap});
  }
  if (spec_.fork) {
    for (int i = 0; i < 2; ++i) plan.push_back({somewhere(), Injection::kFork});
  }
  std::sort(plan.begin(), plan.end(),
            [](const Planned& a, const Planned& b) { return a.at < b.at; });

  size_t next = 0;
  while (true) {
    {
      std::unique_lock lock(mu_);
      if (running_ == 0) break;
      cv_.wait_for(lock, std::chrono::milliseconds(1));
      if (running_ == 0) break;
    }
    const uint64_t done = operations_.load(std::memory_order_relaxed);
    while (next < plan.size() && plan[next].at <= done) {
      switch (plan[next++].what) {
        case Injection::kStormOn:
          if (!storm_.exchange(true)) slot_->storms.fetch_add(1);
          break;
        case Injection::kStormOff:
          storm_.store(false);
          break;
        case Injection::kMunmap:
          Munmap(rng);
          break;
        case Injection::kFork:
          Fork();
          break;
      }
    }
  }
}

int Guest::Run() {
  if (spec_.threads == 0 || spec_.threads > kMaxVmThreads || units_ % focus_units_ != 0) {
    slot_->Fail("vm " + std::to_string(spec_.index) + ": bad shape");
    return kGuestExitSetup;
  }
  Status ready = InstallSignalHandlers();
  if (ready) ready = MapMemory();
  if (ready) ready = HandOver();
  if (!ready) {
    slot_->Fail("vm " + std::to_string(spec_.index) + ": setup: " + ready.error().ToString());
    return kGuestExitSetup;
  }
  std::vector<std::thread> workers;
  {
    std::lock_guard lock(mu_);
    running_ = spec_.threads;
  }
  for (unsigned t = 0; t < spec_.threads; ++t) workers.emplace_back([this, t] { Worker(t); });
  MainThread();
  for (std::thread& w : workers) w.join();
  Doing(kMainThread, VmOp::kDone);
  Progress();
  return kGuestExitOk;
}

}  // namespace

int RunGuest(const GuestSpec& spec, VmSlot* slot) {
  Guest guest(spec, slot);
  return guest.Run();
}

}  // namespace guestmem::soak
