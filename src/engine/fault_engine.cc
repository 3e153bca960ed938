#include "guestmem/fault_engine.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <deque>
#include <future>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/wake_queue.h"
#include "guestmem/log.h"
#include "guestmem/unique_fd.h"

namespace guestmem {
namespace {
constexpr uint64_t kWakeToken = UINT64_MAX;  // epoll data of a worker's eventfd
}  // namespace

// One thread serving the spaces given to it. The space table is guarded by mu_ for insertions,
// removals and look-ups from other threads; only the worker thread itself removes a space, so
// it may use a handler pointer it looked up without holding the lock.
class FaultEngine::Worker {
 public:
  static Result<std::unique_ptr<Worker>> Create(unsigned index, const FaultEngineOptions& options) {
    UniqueFd epoll(epoll_create1(EPOLL_CLOEXEC));
    if (!epoll) return PosixError(errno, "fault engine: epoll_create1");
    UniqueFd wake(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake) return PosixError(errno, "fault engine: eventfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeToken;
    if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0) {
      return PosixError(errno, "fault engine: epoll_ctl(eventfd)");
    }
    auto worker =
        std::unique_ptr<Worker>(new Worker(index, options, std::move(epoll), std::move(wake)));
    worker->thread_ = std::thread([w = worker.get()] { w->Run(); });
    return worker;
  }

  ~Worker() {
    stop_.store(true);
    Wake();
    if (thread_.joinable()) thread_.join();
    // Whatever is left is closed here, after the thread is gone.
    std::vector<SpaceId> ids;
    {
      std::lock_guard lock(mu_);
      for (auto& [id, space] : spaces_) ids.push_back(id);
    }
    for (SpaceId id : ids) {
      Close(id, Error(ErrorCode::kFailedPrecondition, "the fault engine stopped"));
    }
  }

  Status Add(SpaceId id, std::unique_ptr<FaultHandler> handler, ClosedCallback on_closed) {
    const int fds[] = {handler->fd(), handler->work_fd()};
    // Under the lock until every descriptor is watched: the worker may see the uffd's first event
    // at once, and serving (or closing) the space must wait until all of it is registered, or it
    // could close the handler while its other descriptor is still being added.
    std::lock_guard lock(mu_);
    spaces_.emplace(id, Space{std::move(handler), std::move(on_closed), Clock::now()});
    // The uffd, and the eventfd of work it does not announce: both are the space's to serve.
    for (int fd : fds) {
      if (fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = id;
      if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
        const int err = errno;
        for (int added : fds) {
          if (added == fd) break;
          if (added >= 0) epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, added, nullptr);
        }
        spaces_.erase(id);
        return PosixError(err, "fault engine: watching fd " + std::to_string(fd));
      }
    }
    return OkStatus();
  }

  // Calls `fn` with the handler of a space being served, under the lock: Close takes the
  // handler out of the table under it before destroying it. For what other threads may ask of a
  // handler (FaultHandler's thread-safety contract).
  template <typename Fn>
  Status WithHandler(SpaceId id, Fn fn) {
    std::lock_guard lock(mu_);
    auto it = spaces_.find(id);
    if (it == spaces_.end()) {
      return Error(ErrorCode::kNotFound, "space " + std::to_string(id) + " is not served");
    }
    return fn(*it->second.handler);
  }

  bool Has(SpaceId id) const {
    std::lock_guard lock(mu_);
    return spaces_.count(id) != 0;
  }

  std::optional<FaultStats> Stats(SpaceId id) const {
    std::lock_guard lock(mu_);
    auto it = spaces_.find(id);
    if (it == spaces_.end()) return std::nullopt;
    return it->second.handler->stats();
  }

  size_t size() const {
    std::lock_guard lock(mu_);
    return spaces_.size();
  }

  // Asks the worker thread to close the space; waits until it has (at most one turn).
  Result<FaultStats> Remove(SpaceId id) {
    auto request = std::make_shared<RemoveRequest>();
    request->id = id;
    auto done = request->result.get_future();
    {
      std::lock_guard lock(mu_);
      if (spaces_.count(id) == 0) {
        return Error(ErrorCode::kNotFound, "space " + std::to_string(id) + " is not served");
      }
      removals_.push_back(request);
    }
    Wake();
    return done.get();
  }

 private:
  using Clock = std::chrono::steady_clock;

  struct Space {
    std::unique_ptr<FaultHandler> handler;
    ClosedCallback on_closed;
    Clock::time_point last_active;  // worker thread only
  };
  struct RemoveRequest {
    SpaceId id = 0;
    std::promise<Result<FaultStats>> result;
  };

  Worker(unsigned index, const FaultEngineOptions& options, UniqueFd epoll, UniqueFd wake)
      : index_(index), options_(options), epoll_(std::move(epoll)), wake_(std::move(wake)) {}

  void Wake() {
    uint64_t one = 1;
    ssize_t rc = write(wake_.get(), &one, sizeof(one));
    (void)rc;  // EAGAIN: the counter is already non-zero, the worker will wake anyway
  }

  Space* Find(SpaceId id) {
    std::lock_guard lock(mu_);
    auto it = spaces_.find(id);
    return it == spaces_.end() ? nullptr : &it->second;
  }

  // Ends a space: stops watching it, frees it, tells its owner. Worker thread (or destructor).
  FaultStats Close(SpaceId id, const Status& why) {
    Space space;
    {
      std::lock_guard lock(mu_);
      auto it = spaces_.find(id);
      if (it == spaces_.end()) return {};
      space = std::move(it->second);
      spaces_.erase(it);
    }
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, space.handler->fd(), nullptr);
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, space.handler->work_fd(), nullptr);
    wakes_.Disarm(id);
    FaultStats stats = space.handler->stats();
    space.handler.reset();  // frees the uffd, buffers and the source reference now
    if (space.on_closed) space.on_closed(id, why, stats);
    return stats;
  }

  // One turn of a space. Returns whether it has work left for another turn; a space without
  // asks for a wake-up if it has work due later (FaultHandler::wake_at).
  bool Turn(SpaceId id, uint32_t events) {
    Space* space = Find(id);
    if (space == nullptr) return false;
    FaultHandler& handler = *space->handler;
    space->last_active = Clock::now();
    Result<bool> more = (events & EPOLLERR) != 0
                            ? Result<bool>(Error(ErrorCode::kFailedPrecondition,
                                                 handler.name() + ": the uffd reports an error"))
                            : ServeCaught(handler);
    for (auto& child : handler.TakeForkedChildren()) {
      const SpaceId child_id = next_child_id_.fetch_add(1);
      if (auto added = Add(child_id, std::move(child), space->on_closed); !added) {
        Log(LogLevel::kError,
            "fault engine: cannot serve a forked child: " + added.error().ToString());
      }
    }
    if (!more) {
      Close(id, std::move(more).error());
      return false;
    }
    // A space with work left is served again soon anyway; one that waits is woken when it said.
    std::optional<Clock::time_point> wake_at = *more ? std::nullopt : handler.wake_at();
    if (wake_at) {
      wakes_.Arm(id, *wake_at);
    } else {
      wakes_.Disarm(id);
    }
    return *more;
  }

  // Serve() with every exception turned into an error for this space alone.
  Result<bool> ServeCaught(FaultHandler& handler) {
    try {
      return handler.Serve(options_.budget);
    } catch (const std::bad_alloc&) {
      return Error(ErrorCode::kResourceExhausted, handler.name() + ": out of memory");
    } catch (const std::exception& e) {
      return Error(ErrorCode::kInternal, handler.name() + ": " + e.what());
    }
  }

  // Spaces quiet for a while: ask the kernel whether their processes still live.
  void CheckQuietSpaces() {
    const Clock::time_point now = Clock::now();
    if (now - last_liveness_check_ < options_.liveness_interval) return;
    last_liveness_check_ = now;
    std::vector<std::pair<SpaceId, FaultHandler*>> quiet;
    {
      std::lock_guard lock(mu_);
      for (auto& [id, space] : spaces_) {
        if (now - space.last_active >= options_.liveness_interval) {
          quiet.emplace_back(id, space.handler.get());
        }
      }
    }
    for (auto& [id, handler] : quiet) {
      Result<bool> alive = handler->OwnerAlive();
      if (alive && *alive) continue;
      Close(id, alive ? Status(Error(ErrorCode::kPeerGone,
                                     handler->name() + ": the VM's process has exited"))
                      : Status(std::move(alive).error()));
    }
  }

  void ServeRemovals() {
    std::deque<std::shared_ptr<RemoveRequest>> removals;
    {
      std::lock_guard lock(mu_);
      removals.swap(removals_);
    }
    for (auto& request : removals) {
      if (!Has(request->id)) {
        request->result.set_value(
            Error(ErrorCode::kNotFound, "space " + std::to_string(request->id) + " ended"));
        continue;
      }
      request->result.set_value(Close(request->id, OkStatus()));
    }
  }

  void Run() {
    epoll_event events[64];
    // Spaces due a turn, in order; a space with work left after its turn goes to the back.
    std::deque<std::pair<SpaceId, uint32_t>> runnable;
    std::unordered_set<SpaceId> queued;
    std::vector<SpaceId> due;
    const std::chrono::milliseconds idle =
        std::max(options_.liveness_interval, std::chrono::milliseconds(1));
    while (!stop_.load()) {
      // Spaces due a turn: no wait. Else until a descriptor is ready or a space's wake-up.
      const int timeout =
          runnable.empty() ? WaitTimeoutMs(wakes_.earliest(), Clock::now(), idle) : 0;
      const int n = epoll_wait(epoll_.get(), events, 64, timeout);
      if (n < 0 && errno != EINTR) {
        Log(LogLevel::kError, "fault engine worker " + std::to_string(index_) +
                                  ": epoll_wait failed: " + PosixError(errno, "").ToString());
        break;
      }
      for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == kWakeToken) {
          uint64_t count;
          ssize_t rc = read(wake_.get(), &count, sizeof(count));
          (void)rc;
          continue;
        }
        const SpaceId id = events[i].data.u64;  // epoll_event is packed: copy, never bind
        const uint32_t ready = events[i].events;
        if (queued.insert(id).second) runnable.emplace_back(id, ready);
      }
      due.clear();
      wakes_.TakeDue(Clock::now(), &due);
      for (SpaceId id : due) {
        if (queued.insert(id).second) runnable.emplace_back(id, 0);
      }
      // One turn for each space due now; those that come back wait for the next round.
      for (size_t turns = runnable.size(); turns > 0; --turns) {
        auto [id, ready] = runnable.front();
        runnable.pop_front();
        if (Turn(id, ready)) {
          runnable.emplace_back(id, 0);
        } else {
          queued.erase(id);
        }
      }
      ServeRemovals();
      CheckQuietSpaces();
    }
    ServeRemovals();
  }

 public:
  // Children of forks get ids from a range the engine never hands out itself.
  static inline std::atomic<SpaceId> next_child_id_{SpaceId{1} << 62};

 private:
  const unsigned index_;
  const FaultEngineOptions options_;
  UniqueFd epoll_;
  UniqueFd wake_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  Clock::time_point last_liveness_check_ = Clock::now();  // worker thread only
  WakeQueue wakes_;  // worker thread only (and the destructor, once the thread is gone)
  mutable std::mutex mu_;
  std::unordered_map<SpaceId, Space> spaces_;            // GUARDED_BY(mu_)
  std::deque<std::shared_ptr<RemoveRequest>> removals_;  // GUARDED_BY(mu_)
};

struct FaultEngine::Shared {
  std::vector<std::unique_ptr<Worker>> workers;
  std::atomic<SpaceId> next_id{1};
};

Result<std::unique_ptr<FaultEngine>> FaultEngine::Start(const FaultEngineOptions& options) {
  unsigned count = options.workers;
  if (count == 0) count = std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
  auto shared = std::make_unique<Shared>();
  for (unsigned i = 0; i < count; ++i) {
    GM_ASSIGN_OR_RETURN(auto worker, Worker::Create(i, options));
    shared->workers.push_back(std::move(worker));
  }
  return std::unique_ptr<FaultEngine>(new FaultEngine(std::move(shared)));
}

FaultEngine::FaultEngine(std::unique_ptr<Shared> shared) : shared_(std::move(shared)) {}
FaultEngine::~FaultEngine() = default;

Result<SpaceId> FaultEngine::AddSpace(std::unique_ptr<FaultHandler> handler,
                                      ClosedCallback on_closed) {
  if (handler == nullptr) return Error(ErrorCode::kInvalidArgument, "add space: no handler");
  // The least loaded worker takes it.
  Worker* target = shared_->workers.front().get();
  for (auto& worker : shared_->workers) {
    if (worker->size() < target->size()) target = worker.get();
  }
  const SpaceId id = shared_->next_id.fetch_add(1);
  GM_RETURN_IF_ERROR(target->Add(id, std::move(handler), std::move(on_closed)));
  return id;
}

Result<FaultStats> FaultEngine::RemoveSpace(SpaceId id) {
  for (auto& worker : shared_->workers) {
    if (worker->Has(id)) return worker->Remove(id);
  }
  return Error(ErrorCode::kNotFound, "space " + std::to_string(id) + " is not served");
}

template <typename Fn>
Status FaultEngine::WithHandler(SpaceId id, Fn fn) {
  for (auto& worker : shared_->workers) {
    if (worker->Has(id)) return worker->WithHandler(id, std::move(fn));
  }
  return Error(ErrorCode::kNotFound, "space " + std::to_string(id) + " is not served");
}

Status FaultEngine::PostGuestFault(SpaceId id, const GuestFault& fault, GuestFaultDone done) {
  return WithHandler(
      id, [&](FaultHandler& handler) { return handler.PostGuestFault(fault, std::move(done)); });
}

Status FaultEngine::Prefetch(SpaceId id, std::shared_ptr<const WorkingSet> set) {
  return WithHandler(id,
                     [&](FaultHandler& handler) { return handler.StartPrefetch(std::move(set)); });
}

Status FaultEngine::StartBackgroundFill(SpaceId id) {
  return WithHandler(id, [](FaultHandler& handler) { return handler.StartBackgroundFill(); });
}

std::optional<FaultStats> FaultEngine::Stats(SpaceId id) const {
  for (auto& worker : shared_->workers) {
    if (auto stats = worker->Stats(id)) return stats;
  }
  return std::nullopt;
}

size_t FaultEngine::space_count() const {
  size_t total = 0;
  for (auto& worker : shared_->workers) total += worker->size();
  return total;
}

unsigned FaultEngine::worker_count() const {
  return static_cast<unsigned>(shared_->workers.size());
}

}  // namespace guestmem
