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
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

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
  static Result<std::unique_ptr<Worker>> Create(unsigned index) {
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
    auto worker = std::unique_ptr<Worker>(new Worker(index, std::move(epoll), std::move(wake)));
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
    const int fd = handler->fd();
    {
      std::lock_guard lock(mu_);
      spaces_.emplace(id, Space{std::move(handler), std::move(on_closed)});
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = id;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      const int err = errno;
      std::lock_guard lock(mu_);
      spaces_.erase(id);
      return PosixError(err, "fault engine: watching uffd " + std::to_string(fd));
    }
    return OkStatus();
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

  // Asks the worker thread to close the space; waits until it has.
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
  struct Space {
    std::unique_ptr<FaultHandler> handler;
    ClosedCallback on_closed;
  };
  struct RemoveRequest {
    SpaceId id = 0;
    std::promise<Result<FaultStats>> result;
  };

  Worker(unsigned index, UniqueFd epoll, UniqueFd wake)
      : index_(index), epoll_(std::move(epoll)), wake_(std::move(wake)) {}

  void Wake() {
    uint64_t one = 1;
    ssize_t rc = write(wake_.get(), &one, sizeof(one));
    (void)rc;  // EAGAIN: the counter is already non-zero, the worker will wake anyway
  }

  FaultHandler* Find(SpaceId id) {
    std::lock_guard lock(mu_);
    auto it = spaces_.find(id);
    return it == spaces_.end() ? nullptr : it->second.handler.get();
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
    FaultStats stats = space.handler->stats();
    space.handler.reset();  // frees the uffd, buffers and the source reference now
    if (space.on_closed) space.on_closed(id, why, stats);
    return stats;
  }

  void ServeReady(SpaceId id, uint32_t events) {
    FaultHandler* handler = Find(id);
    if (handler == nullptr) return;
    Status status = (events & EPOLLERR) != 0
                        ? Status(Error(ErrorCode::kFailedPrecondition,
                                       handler->name() + ": the uffd reports an error"))
                        : handler->ServeReadyEvents();
    for (auto& child : handler->TakeForkedChildren()) {
      ClosedCallback callback;
      {
        std::lock_guard lock(mu_);
        callback = spaces_[id].on_closed;
      }
      const SpaceId child_id = next_child_id_.fetch_add(1);
      if (auto added = Add(child_id, std::move(child), std::move(callback)); !added) {
        Log(LogLevel::kError, "fault engine: cannot serve a forked child: " +
                                  added.error().ToString());
      }
    }
    if (!status) Close(id, status);
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
    while (!stop_.load()) {
      const int n = epoll_wait(epoll_.get(), events, 64, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
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
        ServeReady(events[i].data.u64, events[i].events);
      }
      ServeRemovals();
    }
    ServeRemovals();
  }

 public:
  // Children of forks get ids from a range the engine never hands out itself.
  static inline std::atomic<SpaceId> next_child_id_{SpaceId{1} << 62};

 private:
  const unsigned index_;
  UniqueFd epoll_;
  UniqueFd wake_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::unordered_map<SpaceId, Space> spaces_;           // GUARDED_BY(mu_)
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
    GM_ASSIGN_OR_RETURN(auto worker, Worker::Create(i));
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
