// WakeQueue: when a fault engine worker's spaces asked to be served again although nothing on
// their descriptors will announce it (FaultHandler::wake_at: a rate-limited fill waiting for its
// budget), and how long the worker may therefore wait for its descriptors.
//
// One deadline per space: arming a space again replaces its earlier deadline, so a space that is
// served meanwhile (a fault came) and asks again is woken once, at its latest request.
//
// Thread safety: one thread at a time (the worker's).
#ifndef GUESTMEM_ENGINE_WAKE_QUEUE_H_
#define GUESTMEM_ENGINE_WAKE_QUEUE_H_

#include <chrono>
#include <cstdint>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace guestmem {

class WakeQueue {
 public:
  using Clock = std::chrono::steady_clock;
  using Id = uint64_t;

  // Wakes `id` at `at` (and not at any time armed for it before).
  void Arm(Id id, Clock::time_point at);
  // Forgets the deadline of `id`, if any.
  void Disarm(Id id);
  // Appends to *due the ids whose deadline is at or before `now`, earliest first, and forgets
  // their deadlines.
  void TakeDue(Clock::time_point now, std::vector<Id>* due);
  // The earliest deadline armed, if any.
  std::optional<Clock::time_point> earliest() const;
  size_t size() const { return by_id_.size(); }

 private:
  std::set<std::pair<Clock::time_point, Id>> by_time_;
  std::unordered_map<Id, Clock::time_point> by_id_;
};

// The timeout, in milliseconds, of an epoll_wait that may last at most `idle` and must end by
// `deadline` (if any): rounded up, never before the deadline, since a wait that ends a moment too
// early finds nothing due and would be followed by waits of 0 ms, a spin, until the deadline.
// 0 once the deadline has passed.
int WaitTimeoutMs(std::optional<WakeQueue::Clock::time_point> deadline,
                  WakeQueue::Clock::time_point now, std::chrono::milliseconds idle);

}  // namespace guestmem

#endif  // GUESTMEM_ENGINE_WAKE_QUEUE_H_
