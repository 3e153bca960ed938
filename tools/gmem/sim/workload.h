// Workloads: what the simulated guest does with its memory once restored.
//
// A workload is planned first (PlanWorkload: a pure, seeded function from a WorkloadSpec to one
// list of 4 KiB page accesses per thread) and then run (RunWorkload: T threads touch a GuestVm's
// memory, each its own list). Kinds:
//   sequential  each thread scans a contiguous share of memory, page by page;
//   random      uniformly random 4 KiB pages, with repeats;
//   sparse      a REAP-like working set: ~10% of the pages, in runs of 1-8 contiguous pages,
//               the runs in random order;
//   trace       a recorded trace (sim/trace.h), replayed in order.
// Planning deals pages out so that no page appears in two threads' lists: a thread may then
// write a page and read it back without another thread changing it underneath.
//
// Verify mode compares every page read byte for byte with the memory file (pread at the same
// offset) and every written page (filled with a pattern derived from its offset) is read back;
// the first mismatch is reported with its file offset. The optional balloon step then does
// MADV_DONTNEED over a range, like a balloon inflating, and checks that its pages read as zero.
//
// Thread safety: PlanWorkload is a pure function. RunWorkload starts and joins its own threads;
// run one at a time per GuestVm.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_WORKLOAD_H_
#define GUESTMEM_TOOLS_GMEM_SIM_WORKLOAD_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"
#include "sim/guest_vm.h"
#include "sim/trace.h"

namespace guestmem {
class Os;
}

namespace guestmem::sim {

// The unit of every workload access, whatever the VM's page size.
inline constexpr uint64_t kAccessBytes = kPageSize4K;

enum class WorkloadKind { kSequential, kRandom, kSparse, kTrace };
enum class AccessMode { kRead, kWrite, kMixed };

std::string_view WorkloadKindName(WorkloadKind kind);
std::string_view AccessModeName(AccessMode mode);
// The inverses, for command lines: "sequential", "random", "sparse" (a trace needs its file, so
// "trace" is not taken here) and "read", "write", "mixed". kInvalidArgument naming the choices.
Result<WorkloadKind> ParseWorkloadKind(std::string_view name);
Result<AccessMode> ParseAccessMode(std::string_view name);

struct WorkloadSpec {
  WorkloadKind kind = WorkloadKind::kSequential;
  AccessMode access = AccessMode::kRead;  // kMixed: each access a write with probability 1/2;
                                          // kTrace ignores it (the trace says r or w)
  unsigned threads = 1;
  // sequential: scan only the first N pages; random: N accesses; sparse: a working set of about
  // N pages. 0: all pages / as many accesses as pages / ~10% of the pages. Ignored by kTrace.
  uint64_t pages = 0;
  uint64_t seed = 1;
  std::vector<TraceAccess> trace;  // kTrace
};

struct Access {
  uint64_t offset = 0;  // memory-file offset of a 4 KiB page
  bool write = false;

  friend bool operator==(const Access&, const Access&) = default;
};

struct WorkloadPlan {
  WorkloadKind kind = WorkloadKind::kSequential;
  AccessMode access = AccessMode::kRead;
  std::vector<std::vector<Access>> threads;  // one list per thread; no page in two lists

  uint64_t accesses() const;        // in all lists, repeats included
  uint64_t distinct_pages() const;  // pages accessed at least once
};

// kInvalidArgument: no threads, memory not a non-zero multiple of 4 KiB, a trace access beyond
// memory (naming its line), an empty trace.
Result<WorkloadPlan> PlanWorkload(const WorkloadSpec& spec, uint64_t memory_bytes);

// MADV_DONTNEED over [offset, offset + length) of guest memory (memory-file offsets), after the
// workload; the pages must then read as zero.
struct BalloonSpec {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// kInvalidArgument unless the range is non-empty, aligned to `page_size` and inside guest memory
// of `memory_bytes`.
Status ValidateBalloon(const BalloonSpec& balloon, uint64_t memory_bytes, uint64_t page_size);

struct RunOptions {
  bool verify = false;
  int mem_file_fd = -1;  // the snapshot memory file; REQUIRED when verify
  std::optional<BalloonSpec> balloon;
  Os* os = nullptr;  // Os::Default() when null
};

struct Mismatch {
  uint64_t offset = 0;  // memory-file offset of the first byte that differs
  uint8_t got = 0;
  uint8_t want = 0;
  bool written = false;  // the page had been written by the workload (want is the pattern)
};

// Keeps in `lowest` whichever of it and `m` lies at the lower offset.
void KeepLowest(std::optional<Mismatch>& lowest, const Mismatch& m);
// Compares one access (kAccessBytes) read at memory-file `offset` with what it must hold: a
// difference is counted in `mismatches` and its first byte kept in `first` if lowest.
void CompareAccess(const std::byte* got, const std::byte* want, uint64_t offset, bool written,
                   uint64_t& mismatches, std::optional<Mismatch>& first);

struct BalloonResult {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t pages_checked = 0;
  uint64_t nonzero_pages = 0;
  std::optional<uint64_t> first_nonzero;  // memory-file offset of the first non-zero byte
};

struct WorkloadResult {
  WorkloadKind kind = WorkloadKind::kSequential;
  AccessMode access = AccessMode::kRead;
  uint64_t elapsed_ns = 0;
  std::vector<uint64_t> thread_ns;
  uint64_t pages_touched = 0;  // accesses made, repeats included
  uint64_t distinct_pages = 0;
  uint64_t pages_read = 0;
  uint64_t pages_written = 0;
  bool verified = false;                   // verify mode was on
  uint64_t mismatches = 0;                 // pages that differed (read or read back after a write)
  std::optional<Mismatch> first_mismatch;  // the lowest offset among them
  std::optional<BalloonResult> balloon;

  // Nothing differed and every ballooned page read as zero.
  bool passed() const { return mismatches == 0 && (!balloon || balloon->nonzero_pages == 0); }
};

// The content a written page holds: 8-byte words derived from the page's offset.
void FillWritePattern(uint64_t offset, std::byte* page);

// Runs `plan` over `vm`'s memory. Errors: kInvalidArgument for a plan access or balloon range
// outside guest memory or unaligned (the balloon to the VM's page size), verify without a memory
// file; the PosixError of a failed pread/madvise; kDataLoss if the memory file is shorter than
// guest memory. Mismatches are results, not errors.
// REQUIRES: no page appears in two threads' lists (PlanWorkload guarantees it); `vm` connected to
// a handler that serves its faults (else the threads wait forever, as a guest would).
Result<WorkloadResult> RunWorkload(const GuestVm& vm, const WorkloadPlan& plan,
                                   const RunOptions& options);

// One JSON object: workload, access, threads, elapsed_ms, thread_ms, pages_touched,
// distinct_pages, pages_read, pages_written, verified, mismatches, first_mismatch (or null),
// balloon (or null), passed.
nlohmann::json WorkloadResultToJson(const WorkloadResult& result);

}  // namespace guestmem::sim

#endif  // GUESTMEM_TOOLS_GMEM_SIM_WORKLOAD_H_
