// FaultHandler: serves the userfaultfd events of one VM's guest memory.
//
// A handler composes the fault pipeline's parts for one VM and drives them in turns:
//   EventSequencer     reads the uffd; non-fault events are applied before any fault is served;
//   PageTracker        which pages still need the snapshot's content (pending) and which were
//                      served, or removed by the balloon, unmapped or poisoned (then a later
//                      fault gets zeros, never the snapshot's content a second time);
//   FaultAroundPolicy  the window installed with a faulting page;
//   FillCursor         a fill (FillMode): every page still pending is installed in the background,
//                      a budget per turn, faults first: at full speed from the first fault on
//                      (fault-all), or from the start, after the working set, at a rate
//                      (TokenBucket), the handler asking to be woken when its budget is back;
//   WorkingSet         what earlier restores needed, installed the same way from the start, in
//                      first-need order (before a fill); what this one's faults need is recorded;
//   PlanWindow         which pages of a window to install, and as data or zeros;
//   ContentFetcher     reads the snapshot's content;
//   PageInstaller      maps it: UFFDIO_COPY / ZEROPAGE into anonymous memory (InstallMode::kCopy,
//                      Firecracker's default), or the seed's full minor trap (kMinorTrap: the
//                      content is written into the guest memory file, then UFFDIO_CONTINUE).
//
// Events. REMOVE (balloon MADV_DONTNEED) makes the range read zero from then on (minor trap: the
// range is punched out of the file too); UNMAP forgets the range; REMAP follows a region that
// moved whole; FORK yields a child handler (TakeForkedChildren) for the child's copy of memory.
// EAGAIN from an install (a non-fault event is pending) reads that event, applies it and retries.
//
// Failures. A page the source cannot supply is poisoned (UFFDIO_POISON: the access gets SIGBUS)
// and logged; on a kernel without UFFDIO_POISON the handler fails instead, so that its owner
// tears the VM down: guestmem never installs zeros where data was expected. A range the VM
// unmapped while its faults were queued (ENOENT) is woken and forgotten; the rest of the VM is
// served on. A fault outside the VM's declared regions is poisoned (or woken if nothing is mapped
// there), counted and logged with decreasing frequency; a VM that keeps doing it is given up.
//
// Guest faults (secret hiding). In Firecracker's secret-hiding VMs a guest (stage-2) access to a
// page whose userfault bit is set exits to the VMM, which forwards it as a FaultRequest; its owner
// posts it here (PostGuestFault, from any thread). In its next turn, before the uffd's faults, the
// handler puts the page's content (with its fault-around window) into the guest memory file,
// clears their userfault bits, and calls the fault's callback, which answers the VMM. In the minor
// trap every page whose content the handler puts into the file gets its bit cleared after that,
// whichever way it went in.
//
// Turns. Serve() does a bounded amount of work (a ServeBudget) and says whether work is left, so
// that one VM's burst of faults or a fill never stalls the others served by the same thread.
//
// Thread safety: Serve/ServeReadyEvents/InstallAll/OwnerAlive/TakeForkedChildren from one thread
// at a time (the engine gives each handler to one worker); stats(), PostGuestFault,
// StartPrefetch and StartBackgroundFill from any thread.
#ifndef GUESTMEM_FAULT_HANDLER_H_
#define GUESTMEM_FAULT_HANDLER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "guestmem/fault_stats.h"
#include "guestmem/guest_layout.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/page_tracker.h"
#include "guestmem/restore_trace.h"
#include "guestmem/result.h"
#include "guestmem/userfault_bitmap.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/working_set.h"

namespace guestmem {

enum class InstallMode {
  kCopy,       // UFFDIO_COPY into anonymous memory (regions registered MISSING)
  kMinorTrap,  // write into the guest memory file, then UFFDIO_CONTINUE (MISSING|MINOR)
};

// What a handler installs beyond what faults ask for (and the working set it prefetches).
enum class FillMode {
  kNone,          // nothing: pages come with faults' windows
  kAtFirstFault,  // Firecracker's fault_all: the first fault starts installing every page, at
                  // full speed
  kBackground,    // from the first turn, once the working set is in: every page not yet served,
                  // at most fill_bytes_per_second (Cloud Hypervisor's fill when idle)
};

inline constexpr uint64_t kDefaultFillBytesPerSecond = uint64_t{256} << 20;
// A background fill out of budget waits until it may install at least this much (or what is
// left): runs of 16 pages install for less a page than single pages do, and the fill takes
// fewer turns.
inline constexpr uint64_t kFillGrainBytes = 64 * 1024;

inline constexpr uint64_t kDefaultFaultAroundBytes = 64 * 1024;
inline constexpr uint64_t kMinFaultAroundBytes = 4 * 1024;
inline constexpr uint64_t kMaxFaultAroundBytes = uint64_t{1} << 30;

struct FaultHandlerOptions {
  std::string name = "vm";  // for log lines: "vm 3 (pid 4242)"
  InstallMode mode = InstallMode::kCopy;
  // Window installed around each fault, a power of two in [kMinFaultAroundBytes,
  // kMaxFaultAroundBytes]; 4 KiB = one page per fault. Regions of 2 MiB pages are always served
  // one 2 MiB page at a time.
  uint64_t fault_around_bytes = kDefaultFaultAroundBytes;
  // Windows that follow the guest (install_policy.h, AdaptiveWindowPolicy): a fault alone brings
  // its page; a sequential stream's window doubles up to kMaxStreamBytes; faults gathering in a
  // fault_around_bytes block bring the whole block. Off: every fault brings its aligned
  // fault_around_bytes window.
  bool adaptive_windows = true;
  // What is installed beyond faults' windows. Faults always go first: a fill installs at most
  // a budget per turn (ServeBudget::fill_bytes) and yields to faults read meanwhile.
  FillMode fill = FillMode::kNone;
  // kBackground (and StartBackgroundFill): bytes a second the fill installs at most, in bursts of
  // at most 20 ms of it (but at least one 2 MiB page). REQUIRES: >= 1.
  uint64_t fill_bytes_per_second = kDefaultFillBytesPerSecond;
  // kMinorTrap: the guest memory file behind the mappings. Region i's content lives at the same
  // offset in this file as in the source (layout.regions()[i].file_offset).
  std::shared_ptr<MemoryFile> memory_file;
  // Faults outside the declared regions tolerated before the VM is given up.
  uint64_t max_stray_faults = 10000;
  // Where served pages are kept; null: a tracker of the handler's own. A shared tracker
  // (PageTracker::CreateShared) outlives the process, so that a successor can take the VM over
  // with it. REQUIRES: page_count() covers the layout's file end, in 4 KiB pages.
  std::shared_ptr<PageTracker> tracker;
  // Taking over a VM that another handler served (with its tracker): every region is woken at
  // once, because the faults the previous handler had read but not answered died with it.
  bool resume = false;
  // kMinorTrap, secret hiding: the VM's KVM userfault bitmap (one bit per page of memory_file).
  std::shared_ptr<UserfaultBitmap> userfault_bitmap;
  // What earlier restores of this snapshot needed (working_set.h): installed in the background
  // from the start, in its order, a budget per turn, faults first. Pages outside the regions are
  // left out.
  std::shared_ptr<const WorkingSet> prefetch;
  // Told every page a fault needed, in order (what the next restore will prefetch).
  std::shared_ptr<WorkingSetRecorder> recorder;
  // Where each install and each fault's latency are written (restore_trace.h); null: nowhere.
  // Written from the handler's thread only; a forked child's handler writes none.
  std::shared_ptr<RestoreTraceWriter> trace;
};

// The largest window a sequential stream grows to (adaptive_windows).
inline constexpr uint64_t kMaxStreamBytes = uint64_t{1} << 20;

// A guest (stage-2) fault of a secret-hiding VM, as Firecracker forwards it.
struct GuestFault {
  uint32_t vcpu = 0;
  uint64_t flags = 0;  // kvm_run.memory_fault.flags, echoed in the reply
  GuestPhysAddr gpa;
};
// Told, on the thread that serves the handler, how a posted guest fault ended: OK once the page's
// content is in the guest memory file and its userfault bit is clear; else why it cannot be
// (kOutOfRange: the address is in no region; the source's error for a page it cannot supply).
using GuestFaultDone = std::function<void(const GuestFault& fault, const Status& status)>;

// How much one Serve() call may do before it returns.
struct ServeBudget {
  size_t faults = 64;                       // fault events served
  uint64_t fill_bytes = uint64_t{8} << 20;  // background fill installed
  size_t eagain_retries = 32;               // installs retried after EAGAIN
};

class FaultHandler {
 public:
  // Validates that every region lies inside the source (and inside the memory file in
  // kMinorTrap), and the options; kInvalidArgument / kOutOfRange otherwise.
  static Result<std::unique_ptr<FaultHandler>> Create(Userfaultfd uffd, GuestLayout layout,
                                                      std::shared_ptr<const PageSource> source,
                                                      FaultHandlerOptions options);
  ~FaultHandler();
  FaultHandler(const FaultHandler&) = delete;
  FaultHandler& operator=(const FaultHandler&) = delete;

  // The uffd to poll for readability.
  int fd() const;
  const std::string& name() const;
  const GuestLayout& layout() const;

  // One turn: reads what is pending, applies non-fault events, serves queued faults and then
  // background fill within `budget`. Returns true when work is left that polling the uffd would
  // not announce (faults already read, a fill in progress): call again soon. kPeerGone when the
  // VM's process has exited (the handler is finished); another error when the VM can no longer
  // be served (then the owner should drop the handler).
  Result<bool> Serve(const ServeBudget& budget = {});
  // After a Serve() that returned false: the time at which work becomes due that neither fd()
  // nor work_fd() will announce (a rate-limited background fill waiting for its budget), when
  // Serve() should be called again; std::nullopt if there is none.
  std::optional<std::chrono::steady_clock::time_point> wake_at() const;

  // Turns until no work is left: every pending event served (and, with a fill at full speed once
  // it has started, the fill finished; a background fill goes as far as its rate lets it).
  Status ServeReadyEvents();

  // Installs every page still pending, region by region, in large chunks, at full speed (a
  // background fill under way goes on so); returns when done.
  Status InstallAll();

  // Whether the VM's process still lives (an adopted uffd says nothing when it exits).
  Result<bool> OwnerAlive() const;

  // Queues a guest fault for the next turn; `done` runs when it is resolved. Any thread. Faults
  // still queued when the handler is destroyed are dropped without their callbacks.
  // ERRORS: kFailedPrecondition outside the minor trap.
  Status PostGuestFault(const GuestFault& fault, GuestFaultDone done);
  // Starts prefetching `set` (as FaultHandlerOptions::prefetch would have from the start, in
  // place of what is left of it) in the next turn. Any thread. For an owner that may give a
  // working set only later: a secret-hiding VMM sets every userfault bit after its first message,
  // so bits cleared before that would be set again.
  Status StartPrefetch(std::shared_ptr<const WorkingSet> set);
  // Starts a background fill (as FillMode::kBackground does from the first turn) in the next
  // turn, after the prefetch, at options' fill_bytes_per_second. Any thread. For an owner that may
  // start it only later, as StartPrefetch. A fill already under way goes on as it is.
  Status StartBackgroundFill();
  // Readable while work waits that the uffd does not announce (posted guest faults, a prefetch
  // that starts with the VM): poll it beside fd().
  int work_fd() const;

  // Handlers for children forked since the last call (UFFD_EVENT_FORK), sharing this handler's
  // source and options, starting from this handler's served pages.
  std::vector<std::unique_ptr<FaultHandler>> TakeForkedChildren();

  FaultStats stats() const;

 private:
  class Pipeline;
  explicit FaultHandler(std::unique_ptr<Pipeline> pipeline);
  std::unique_ptr<Pipeline> p_;
};

}  // namespace guestmem

#endif  // GUESTMEM_FAULT_HANDLER_H_
