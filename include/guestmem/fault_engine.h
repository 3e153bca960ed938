// FaultEngine: serves the faults of many VMs at once.
//
// The engine runs a few worker threads, each with an epoll set. A VM's FaultHandler (a "space")
// is given to one worker, which alone serves it, so the events of one VM are handled in the order
// the kernel reports them and without locks on the fault path; different VMs are served in
// parallel. Handlers for forked children join the parent's worker.
//
// Fairness: a worker serves its spaces in turns (FaultHandler::Serve with the engine's
// ServeBudget). A space with work left after its turn (faults already read, a fault-all fill in
// progress) waits behind every other space that is ready, so one VM's burst of faults, its
// fault-all or a VM that keeps faulting outside its memory never stalls the others. A space with
// no work left now but work due later, which none of its descriptors will announce (a background
// fill that has used up its rate: FaultHandler::wake_at), is woken at that time: its worker
// waits on epoll no longer than the earliest such time and never polls in between, so a
// rate-limited VM costs no turns while it waits and the others are served as ever.
//
// A space ends when its owner removes it (RemoveSpace, e.g. on the VMM's socket hang-up) or by
// itself when the VM's process has exited or can no longer be served; then `on_closed` (if given)
// is called once, from the worker thread, with the reason and the final statistics, and
// everything the space held (uffd, buffers, source reference) is freed. An adopted uffd says
// nothing when its process exits, so a worker asks the kernel about each space that has been
// quiet for `liveness_interval` (FaultHandler::OwnerAlive); forked children that exited are found
// that way. No exception escapes a worker: one thrown while serving a space (an allocation that
// failed) ends that space with kResourceExhausted.
//
// Thread safety: all public methods may be called from any thread. on_closed must not call
// RemoveSpace on its own space (it is already closed) and must not block for long.
#ifndef GUESTMEM_FAULT_ENGINE_H_
#define GUESTMEM_FAULT_ENGINE_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "guestmem/fault_handler.h"
#include "guestmem/fault_stats.h"
#include "guestmem/result.h"

namespace guestmem {

using SpaceId = uint64_t;

struct FaultEngineOptions {
  unsigned workers = 0;  // 0: one per CPU, at most 4
  ServeBudget budget;    // what one space may do in one turn
  // How long a space may be quiet before the worker checks that its process still lives.
  std::chrono::milliseconds liveness_interval{1000};
};

class FaultEngine {
 public:
  using ClosedCallback = std::function<void(SpaceId id, const Status& why, const FaultStats&)>;

  static Result<std::unique_ptr<FaultEngine>> Start(const FaultEngineOptions& options = {});
  // Stops the workers and closes every space (their on_closed callbacks run).
  ~FaultEngine();
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;

  // Starts serving `handler`. `on_closed` is told when the space ends by itself or is removed.
  Result<SpaceId> AddSpace(std::unique_ptr<FaultHandler> handler, ClosedCallback on_closed = {});
  // Stops serving the space, frees it and returns its final statistics. kNotFound if it is not
  // (or no longer) served.
  Result<FaultStats> RemoveSpace(SpaceId id);
  // Statistics of a space being served, or std::nullopt.
  std::optional<FaultStats> Stats(SpaceId id) const;
  // Gives a guest fault of a secret-hiding VM to its space (FaultHandler::PostGuestFault): served
  // in the space's next turn, before its uffd faults; `done` runs on the space's worker.
  // ERRORS: kNotFound if the space is not (or no longer) served; the handler's.
  Status PostGuestFault(SpaceId id, const GuestFault& fault, GuestFaultDone done);
  // Starts prefetching `set` into the space (FaultHandler::StartPrefetch).
  // ERRORS: kNotFound if the space is not (or no longer) served.
  Status Prefetch(SpaceId id, std::shared_ptr<const WorkingSet> set);
  // Starts a background fill of the space, after its prefetch (FaultHandler::StartBackgroundFill).
  // ERRORS: kNotFound if the space is not (or no longer) served.
  Status StartBackgroundFill(SpaceId id);
  size_t space_count() const;
  unsigned worker_count() const;

 private:
  class Worker;
  struct Shared;
  explicit FaultEngine(std::unique_ptr<Shared> shared);
  // Calls fn(FaultHandler&) for the space's handler, on the caller's thread; kNotFound if no
  // worker serves the space.
  template <typename Fn>
  Status WithHandler(SpaceId id, Fn fn);
  std::unique_ptr<Shared> shared_;
};

}  // namespace guestmem

#endif  // GUESTMEM_FAULT_ENGINE_H_
