// BackgroundLoader: loads items (a packed snapshot's chunks, by index) on threads of its own, so
// that whoever needs one need not wait for it on a thread that has other work.
//
// Two queues: items someone is waiting for (Need: a fault's content), served first, each with the
// callbacks to tell when it is in; and items wanted ahead (Ahead: a working set about to be
// prefetched, the chunks after one a reader waited for), bounded, dropped when full. An item is
// loaded once however often it is asked for while queued. `load` says whether the item is now at
// hand; an item whose load failed is remembered with its error, so that callers meet the error at
// once instead of waiting again and again: for good when trying again cannot help (IsRetryable),
// else for kRetryFailedAfter, after which the next Need loads it again.
//
// Thread safety: safe from many threads at once; callbacks run on a loader thread, without the
// loader's lock held.
#ifndef GUESTMEM_SNAPSHOT_BACKGROUND_LOADER_H_
#define GUESTMEM_SNAPSHOT_BACKGROUND_LOADER_H_

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {

class BackgroundLoader {
 public:
  using Load = std::function<Status(size_t item)>;
  using Ready = std::function<void()>;
  using Clock = std::chrono::steady_clock;
  static constexpr Clock::duration kRetryFailedAfter = std::chrono::seconds(1);

  // `threads` == 0: nothing is loaded in the background (Need runs `ready` at once, Ahead does
  // nothing): callers then read on their own thread.
  BackgroundLoader(unsigned threads, size_t ahead_limit, Load load)
      : ahead_limit_(ahead_limit), load_(std::move(load)) {
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~BackgroundLoader() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  BackgroundLoader(const BackgroundLoader&) = delete;
  BackgroundLoader& operator=(const BackgroundLoader&) = delete;

  bool enabled() const { return !threads_.empty(); }

  // Queues `item` ahead of everything wanted ahead; `ready` runs once it is loaded (or failed).
  void Need(size_t item, Ready ready) {
    if (!enabled()) {
      ready();
      return;
    }
    {
      std::lock_guard lock(mu_);
      auto [it, fresh] = waiting_.try_emplace(item);
      it->second.push_back(std::move(ready));
      if (fresh) urgent_.push_back(item);
    }
    cv_.notify_one();
  }

  // Queues items to load when nothing is needed; beyond the limit they are dropped.
  void Ahead(const std::vector<size_t>& items) {
    if (!enabled() || items.empty()) return;
    {
      std::lock_guard lock(mu_);
      for (size_t item : items) {
        if (ahead_.size() >= ahead_limit_) break;
        ahead_.push_back(item);
      }
    }
    cv_.notify_all();
  }

  // The error of the last load of `item`, while it is remembered.
  std::optional<Error> Failed(size_t item) const {
    std::lock_guard lock(mu_);
    auto it = failed_.find(item);
    if (it == failed_.end() || Clock::now() >= it->second.until) return std::nullopt;
    return it->second.error;
  }

 private:
  void Run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stopping_ || !urgent_.empty() || !ahead_.empty(); });
      if (stopping_) return;
      std::deque<size_t>& queue = urgent_.empty() ? ahead_ : urgent_;
      const size_t item = queue.front();
      queue.pop_front();
      lock.unlock();
      Status loaded = load_(item);
      lock.lock();
      if (loaded) {
        failed_.erase(item);
      } else {
        const bool for_good = !IsRetryable(loaded.error().code());
        failed_.insert_or_assign(
            item, Failure{std::move(loaded).error(),
                          for_good ? Clock::time_point::max() : Clock::now() + kRetryFailedAfter});
      }
      std::vector<Ready> ready;
      if (auto it = waiting_.find(item); it != waiting_.end()) {
        ready = std::move(it->second);
        waiting_.erase(it);
      }
      lock.unlock();
      for (Ready& r : ready) r();
      lock.lock();
    }
  }

  struct Failure {
    Error error;
    Clock::time_point until;
  };

  const size_t ahead_limit_;
  const Load load_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<size_t> urgent_, ahead_;                          // GUARDED_BY(mu_)
  std::unordered_map<size_t, std::vector<Ready>> waiting_;     // GUARDED_BY(mu_)
  std::unordered_map<size_t, Failure> failed_;                 // GUARDED_BY(mu_)
  bool stopping_ = false;                                      // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace guestmem

#endif  // GUESTMEM_SNAPSHOT_BACKGROUND_LOADER_H_
