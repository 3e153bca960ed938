// The chaos soak behind `gmem soak` (docs/soak.md), modelled on the kernel's uffd-stress: for a
// budget of time and/or faults, many VMs restore concurrently from one snapshot through a
// FaultEngine, each checking every byte it reads, while faults are injected:
//   balloon  MADV_DONTNEED storms, racing other threads' faults in the same 64 KiB windows;
//   munmap   a window of guest memory unmapped while the VM's threads fault in it;
//   fork     the VM forks (UFFD_FEATURE_EVENT_FORK) and the child checks its copy;
//   kill     SIGKILL of a VM at a random point of its restore;
//   ioerror  the source fails to read a fixed set of pages (through the Os seam): touching one
//            must raise SIGBUS, exactly there.
// The driver plays the daemon: it listens on a Unix socket in a temporary directory, receives
// each VM's Firecracker handshake, and serves it with FaultHandler::Create and
// FaultEngine::AddSpace, removing the space when the VM hangs up. The run fails, with the first
// problem named, on a wrong byte (VM, page, offset, expected and actual byte), a signal where none
// belongs, a VM that makes no progress for `hang_seconds` (a hang), an enabled injection that never
// happened, or a leak: descriptors or spaces of the daemon left once every VM is gone.
//
// Thread safety: RunSoak once at a time per process, from a process that has one thread (it forks
// the VMs' launcher before the fault engine starts its threads).
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_SOAK_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_SOAK_H_

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

#include "guestmem/result.h"

namespace guestmem::soak {

enum Injection : uint32_t {
  kInjectBalloon = 1 << 0,
  kInjectMunmap = 1 << 1,
  kInjectFork = 1 << 2,
  kInjectKill = 1 << 3,
  kInjectIoError = 1 << 4,
};
inline constexpr uint32_t kAllInjections =
    kInjectBalloon | kInjectMunmap | kInjectFork | kInjectKill | kInjectIoError;

// "balloon,munmap,fork,kill,ioerror" in any order and combination; "all"; "none" (or empty).
// kInvalidArgument naming an unknown injection and the choices.
Result<uint32_t> ParseInjections(std::string_view list);
// The canonical list, "balloon,kill"; "none" for 0.
std::string InjectionList(uint32_t injections);

inline constexpr int kSoakPassed = 0;
inline constexpr int kSoakFailed = 1;     // a wrong byte, a hang, a leak...
inline constexpr int kSoakCannotRun = 2;  // bad options, or the machine cannot run it

struct SoakOptions {
  double seconds = 0;           // stop after this long (0: no time limit)
  uint64_t faults = 0;          // stop after this many faults served (0: no limit); neither: 30 s
  unsigned vms = 4;             // VMs at a time
  unsigned threads = 3;         // per VM
  uint64_t memory_mib = 32;     // the snapshot, and each VM's guest memory; a multiple of 8
  uint32_t max_regions = 3;     // each VM splits its memory into 1..max_regions regions
  uint64_t operations = 20000;  // per VM, then it exits and another starts
  uint32_t inject = kAllInjections;
  uint64_t fault_around_kib = 64;
  bool fault_all = false;
  bool background_fill = false;     // every VM filled in the background (FillMode::kBackground)
  unsigned workers = 2;             // fault engine worker threads
  bool huge_pages = false;          // every other VM on 2 MiB pages, when enough are free
  uint64_t reserve_huge_pages = 0;  // raise vm.nr_hugepages by this much for the run
  uint32_t ioerror_permille = 2;    // of the snapshot's data pages that fail to read
  double hang_seconds = 15;         // a VM making no progress this long is hung
  double leak_seconds = 10;         // how long the daemon has to free everything at the end
  uint64_t seed = 1;
  bool verbose = false;  // the fault engine's log lines as they come
  // Flips a byte of this snapshot page after writing it, as a disk or a handler might: a check of
  // the soak itself, whose VMs must then report the wrong byte.
  std::optional<uint64_t> corrupt_page;
};

// What a run did and found, for callers that check it (tests); the report on `out` says the same.
struct SoakSummary {
  uint64_t vms = 0, huge_vms = 0, kills = 0;
  uint64_t faults = 0, pages_poisoned = 0, forked_spaces = 0;
  uint64_t balloons = 0, storms = 0, munmaps = 0, forks = 0, failed_reads = 0;
  uint64_t bytes_verified = 0, sigbus = 0, sigsegv = 0;
  std::string failure;  // empty when the run passed
};

// Runs the soak, writing its report to `out` (and what it found to *summary if given). Returns
// kSoakPassed, kSoakFailed or kSoakCannotRun.
int RunSoak(const SoakOptions& options, std::FILE* out, SoakSummary* summary = nullptr);

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_SOAK_H_
