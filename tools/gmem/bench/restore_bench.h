// Restore benchmark: one restore of a snapshot by one contestant, timed and then verified.
//
// A contestant is a way to get a VM's memory back from its snapshot memory file:
//   kFileBackend  what Firecracker does without a page-fault handler: MAP_PRIVATE of the memory
//                 file (page cache hot); the kernel pages content in on each fault;
//   kPerPage      Firecracker's example on-demand handler, the reference: one thread, poll(2),
//                 one event read and one 4 KiB UFFDIO_COPY (from a mapping of the file) per fault;
//   kOnDemand     guestmem's FaultEngine copying into anonymous memory with fault-around;
//   kFaultAll     the same engine installing everything on the first fault;
//   kMinorTrap    guestmem's full minor trap: a shmem guest memory file mapped MAP_SHARED and
//                 registered MISSING|MINOR; content is written into the file, then CONTINUE;
//   kLearned      kOnDemand on the second restore of the snapshot: the first restore (untimed)
//                 ran a workload that differs from this one in 5% of its pages, and what its
//                 faults needed was learned (WorkingSet) and is prefetched from the start, as
//                 gmem serve does;
//   kPacked       kOnDemand from a packed snapshot of the same memory file (gmem snapshot pack):
//                 a fresh PackedSource each run, so every chunk is read and decompressed;
//   kPackedShared kOnDemand from one packed source shared by every run, as a daemon's VMs share
//                 it: chunks an earlier run decompressed are in its cache;
//   kPackedLearned kLearned from that packed snapshot (a fresh source for the timed restore);
//   kFloor        the physical limit of userfaultfd, no handler at all: the pages the workload
//                 touches, installed in bulk before it runs (runs of data pages with one
//                 UFFDIO_COPY each, runs of zero pages — by content — with one UFFDIO_ZEROPAGE),
//                 from as many threads as the guest has, each taking one contiguous slice of the
//                 sorted pages; then the workload runs without a single fault.
// Every run gets fresh destination memory, made the same way for all (a new mapping, never
// touched before the timed part). With RestoreOptions::cold, the memory file is dropped from the
// page cache before each run (posix_fadvise DONTNEED), so that each contestant reads it cold. The
// timed part is the workload's threads touching their pages, from the first thread's start to the
// last one's end; serving faults happens meanwhile. After it, every page the workload touched is
// compared with the snapshot (written pages with what was written), untimed.
//
// Thread safety: RunRestore starts and joins its own threads; run one at a time.
#ifndef GUESTMEM_TOOLS_GMEM_BENCH_RESTORE_BENCH_H_
#define GUESTMEM_TOOLS_GMEM_BENCH_RESTORE_BENCH_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "guestmem/mapping.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"
#include "guestmem/snapshot_packer.h"
#include "guestmem/unique_fd.h"
#include "sim/workload.h"

namespace guestmem::bench {

enum class Contestant {
  kFileBackend,
  kPerPage,
  kOnDemand,
  kLearned,
  kFaultAll,
  kMinorTrap,
  kPacked,
  kPackedShared,
  kPackedLearned,
  kFloor
};
inline constexpr Contestant kAllContestants[] = {
    Contestant::kFileBackend, Contestant::kPerPage,   Contestant::kOnDemand, Contestant::kLearned,
    Contestant::kFaultAll,    Contestant::kMinorTrap, Contestant::kPacked,
    Contestant::kPackedShared, Contestant::kPackedLearned, Contestant::kFloor};
// Whether a contestant restores from the packed snapshot (RestoreSnapshot::MakePacked first).
inline bool UsesPacked(Contestant c) {
  return c == Contestant::kPacked || c == Contestant::kPackedShared ||
         c == Contestant::kPackedLearned;
}

// The share of a learned restore's pages that its first restore did not touch (kLearned).
inline constexpr double kLearnedDifference = 0.05;

// "file", "per-page", "on-demand", "learned", "fault-all", "minor-trap", "packed",
// "packed-shared", "packed-learned", "floor": what
// --contestants takes.
std::string_view ContestantName(Contestant contestant);
// One line for tables: "File backend (MAP_PRIVATE)".
std::string_view ContestantTitle(Contestant contestant);
Result<Contestant> ParseContestant(std::string_view name);

// The snapshot every run restores from: the memory file, a read-only view of it (the per-page
// baseline's copy source, and what verification compares with) and guestmem's page source.
class RestoreSnapshot {
 public:
  // Opens `path` and reads it once through, so that its page cache is hot for every contestant,
  // noting which pages hold only zeros.
  static Result<RestoreSnapshot> Open(const std::string& path);
  // Drops the memory file (and the packed one) from the page cache, and this view's mappings of
  // it: the next read of it goes to the disk.
  Status Evict() const;
  // Packs the memory file into `packed_path` for the packed contestants.
  Result<PackSummary> MakePacked(const std::string& packed_path, const PackOptions& options);
  // A fresh source of the packed snapshot: nothing decompressed yet.
  // REQUIRES: MakePacked succeeded.
  Result<std::shared_ptr<const PageSource>> OpenPacked() const;
  const std::string& packed_path() const { return packed_path_; }
  // The packed source every kPackedShared run shares. REQUIRES: MakePacked succeeded.
  const std::shared_ptr<const PageSource>& shared_packed() const { return shared_packed_; }
  // Whether page `page` (4 KiB) of the file holds only zeros.
  bool zero_page(uint64_t page) const { return zero_pages_[page]; }

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  uint64_t size() const { return view_.size(); }
  std::span<const std::byte> view() const { return view_.span(); }
  const std::shared_ptr<const PageSource>& source() const { return source_; }

 private:
  RestoreSnapshot(std::string path, UniqueFd fd, Mapping view,
                  std::shared_ptr<const PageSource> source, std::vector<bool> zero_pages)
      : path_(std::move(path)),
        fd_(std::move(fd)),
        view_(std::move(view)),
        source_(std::move(source)),
        zero_pages_(std::move(zero_pages)) {}

  std::string path_;
  UniqueFd fd_;
  Mapping view_;
  std::shared_ptr<const PageSource> source_;
  std::vector<bool> zero_pages_;
  std::string packed_path_;
  std::shared_ptr<const PageSource> shared_packed_;
};

struct RestoreOptions {
  uint64_t fault_around_bytes = kDefaultFaultAroundBytes;  // kOnDemand, kMinorTrap
  bool adaptive_windows = true;                            // FaultHandlerOptions'
  unsigned workers = 1;                                    // guestmem engine threads
  bool cold = false;  // evict the memory file from the page cache before the run
  // guestmem's contestants: the timed restore's trace is written here (restore_trace.h); empty:
  // none. The file must not exist.
  std::string trace_path;
  // guestmem's contestants: told when the timed restore's space starts being served (on its
  // engine) and when it has been removed, with its final statistics; the engine lives until
  // after the second call. From RunRestore's thread.
  std::function<void(const FaultEngine& engine, SpaceId space)> on_serving;
  std::function<void(SpaceId space, const FaultStats& stats)> on_served;
};

struct RestoreRun {
  uint64_t elapsed_ns = 0;
  // Fault events the handler read; for kFileBackend the minor faults the process took.
  uint64_t faults = 0;
  // 4 KiB pages the handler installed (copied, zeroed or continued); 0 for kFileBackend.
  uint64_t pages_installed = 0;
  // kFaultAll: how long installing everything took, inside the handler.
  uint64_t fault_all_ns = 0;
  uint64_t latency_p50_ns = 0;    // guestmem's fault service latency (0 for the others)
  uint64_t pages_prefetched = 0;  // kLearned: installed ahead of the guest's faults
  uint64_t pages_verified = 0;
  uint64_t mismatches = 0;  // pages whose bytes differ from the snapshot (or what was written)
};

// One restore of `snapshot` by `contestant` while `plan` runs. Errors are set-up failures
// (kUnsupported where the kernel lacks what the contestant needs); mismatches are results.
Result<RestoreRun> RunRestore(Contestant contestant, const RestoreSnapshot& snapshot,
                              const sim::WorkloadPlan& plan, const RestoreOptions& options = {});

// Many VMs restoring the same snapshot at once on one FaultEngine (guestmem on-demand, the
// options' workers; 0: one per CPU): each VM its own fresh memory and its own guest threads
// running `plan`, all started together.
struct ManyVmsRun {
  uint64_t total_ns = 0;      // from the first VM's start to the last one's end
  uint64_t median_vm_ns = 0;  // one VM's own time, the median over the VMs
  uint64_t faults = 0;        // in all
  uint64_t pages_verified = 0;
  uint64_t mismatches = 0;
};
Result<ManyVmsRun> RunManyVms(const RestoreSnapshot& snapshot, const sim::WorkloadPlan& plan,
                              unsigned vms, const RestoreOptions& options = {});

// `plan` with `share` of its distinct pages swapped for pages it does not touch (each swapped page
// the same way in every access to it; no page in two threads' lists), from `seed`.
sim::WorkloadPlan PerturbPlan(const sim::WorkloadPlan& plan, uint64_t snapshot_pages, double share,
                              uint64_t seed);

// Single-thread memcpy of the whole snapshot into memory already touched, in bytes per second:
// the bandwidth a restore that installs everything could at best reach on this machine.
double MeasureMemcpyBandwidth(const RestoreSnapshot& snapshot);

}  // namespace guestmem::bench

#endif  // GUESTMEM_TOOLS_GMEM_BENCH_RESTORE_BENCH_H_
