#include "guestmem/event_sequencer.h"

#include <poll.h>
#include <sched.h>

#include <variant>

namespace guestmem {

Result<size_t> EventSequencer::Read(std::vector<UffdEvent>* changes) {
  events_.clear();
  GM_ASSIGN_OR_RETURN(size_t count, uffd_->ReadEvents(&events_, batch_));
  const auto now = std::chrono::steady_clock::now();
  for (UffdEvent& event : events_) {
    if (auto* fault = std::get_if<PagefaultEvent>(&event)) {
      queue_.push_back(QueuedFault{*fault, now});
    } else {
      changes->push_back(std::move(event));
    }
  }
  return count;
}

Result<size_t> EventSequencer::ReadAfterAgain(std::vector<UffdEvent>* changes,
                                              std::chrono::milliseconds wait) {
  GM_ASSIGN_OR_RETURN(size_t count, Read(changes));
  if (count > 0) return count;
  // The event is announced (installs fail) a moment before it is queued: give the announcing
  // thread the CPU first, then wait for the uffd to turn readable.
  sched_yield();
  GM_ASSIGN_OR_RETURN(count, Read(changes));
  if (count > 0) return count;
  pollfd pfd{uffd_->fd(), POLLIN, 0};
  (void)poll(&pfd, 1, static_cast<int>(wait.count()));
  return Read(changes);
}

}  // namespace guestmem
