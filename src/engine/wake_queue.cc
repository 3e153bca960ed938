#include "engine/wake_queue.h"

#include <algorithm>
#include <limits>

namespace guestmem {

void WakeQueue::Arm(Id id, Clock::time_point at) {
  auto [it, added] = by_id_.try_emplace(id, at);
  if (!added) {
    if (it->second == at) return;
    by_time_.erase({it->second, id});
    it->second = at;
  }
  by_time_.emplace(at, id);
}

void WakeQueue::Disarm(Id id) {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return;
  by_time_.erase({it->second, id});
  by_id_.erase(it);
}

void WakeQueue::TakeDue(Clock::time_point now, std::vector<Id>* due) {
  while (!by_time_.empty() && by_time_.begin()->first <= now) {
    const Id id = by_time_.begin()->second;
    by_time_.erase(by_time_.begin());
    by_id_.erase(id);
    due->push_back(id);
  }
}

std::optional<WakeQueue::Clock::time_point> WakeQueue::earliest() const {
  if (by_time_.empty()) return std::nullopt;
  return by_time_.begin()->first;
}

int WaitTimeoutMs(std::optional<WakeQueue::Clock::time_point> deadline,
                  WakeQueue::Clock::time_point now, std::chrono::milliseconds idle) {
  const int64_t idle_ms = std::clamp<int64_t>(idle.count(), 0, std::numeric_limits<int>::max());
  if (!deadline) return static_cast<int>(idle_ms);
  if (*deadline <= now) return 0;
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - now).count();
  return static_cast<int>(std::min<int64_t>(left, idle_ms));
}

}  // namespace guestmem
