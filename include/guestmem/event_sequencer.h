// EventSequencer: the fault pipeline's first stage — reads a VM's userfaultfd events in the order
// they must be applied.
//
// The kernel may report a REMOVE (balloon MADV_DONTNEED), UNMAP, REMAP or FORK after a fault that
// it causally precedes, and while such an event is unread every install fails with EAGAIN. So each
// batch read is split: non-fault events are handed back to be applied first, faults wait in a
// queue in arrival order. After an install stopped with EAGAIN, ReadAfterAgain waits (briefly,
// bounded) for the pending event to become readable.
//
// Thread safety: one thread at a time.
#ifndef GUESTMEM_EVENT_SEQUENCER_H_
#define GUESTMEM_EVENT_SEQUENCER_H_

#include <chrono>
#include <cstddef>
#include <deque>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/userfaultfd.h"

namespace guestmem {

struct QueuedFault {
  PagefaultEvent event;
  std::chrono::steady_clock::time_point read_at;  // when the daemon read it
};

class EventSequencer {
 public:
  // REQUIRES: uffd outlives the sequencer; 0 < batch <= kUffdMaxEventBatch.
  explicit EventSequencer(Userfaultfd* uffd, size_t batch = 64) : uffd_(uffd), batch_(batch) {}

  // Reads one batch of pending events without blocking. Faults join the queue; every other event
  // is appended to *changes, in the order read: apply them before serving any queued fault.
  // Returns how many events were read (0: none was pending).
  Result<size_t> Read(std::vector<UffdEvent>* changes);
  // Like Read, after an install stopped with EAGAIN: the kernel announces a non-fault event before
  // it can be read, so when nothing is readable this waits up to `wait` for it first.
  Result<size_t> ReadAfterAgain(std::vector<UffdEvent>* changes, std::chrono::milliseconds wait);

  size_t batch() const { return batch_; }
  bool empty() const { return queue_.empty(); }
  size_t size() const { return queue_.size(); }
  // REQUIRES: !empty().
  const QueuedFault& front() const { return queue_.front(); }
  void pop() { queue_.pop_front(); }

 private:
  Userfaultfd* uffd_;
  size_t batch_;
  std::vector<UffdEvent> events_;
  std::deque<QueuedFault> queue_;
};

}  // namespace guestmem

#endif  // GUESTMEM_EVENT_SEQUENCER_H_
