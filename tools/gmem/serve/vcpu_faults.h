// VcpuFaults: one secret-hiding VM's vCPU faults as the `gmem serve` loop serves them: FaultRequest
// frames on the VM's Uffd socket (synchronous faults) and on its APF socket (async faults
// Firecracker could not make exitless), and the exitless APF rings message 2 announced.
//
// Reading. A socket is only looked at (MSG_PEEK) until whole frames are found; each is decoded,
// recorded in the VM's VcpuRequestTable and posted to the VM's space, and only then are exactly
// those frames' bytes consumed. A partial frame stays on the socket, so the daemon holds no byte of
// it (a successor that takes the socket over finds it whole). A frame's length is checked against
// the longest valid request before its payload is waited for: nothing a client announces decides
// an allocation. A malformed frame, a frame without a gpa, or descriptors riding on frames are the
// VM's protocol error: reading stops, and the server drops that VM alone. Each turn reads a budget
// of frames; at most VcpuRequestTable::kSlots requests are taken and not yet answered, beyond which
// the socket is left unread until answers go out.
//
// Rings. A ring's notifications are recorded, then consumed and posted, at most 64 a vCPU at a
// time; when the ring is empty it is armed (re-checked after arming, drained again if entries
// came).
//
// Answering. When the space has served a posted fault, Complete() turns it into its answer: the
// FaultReply echoing the request (vcpu, offset, flags, gpa; len 4096; zero false), queued whole on
// the socket it came from; or the completion pushed into the vCPU's complete ring. FinishBatch()
// then writes what is queued (frames only ever whole: a partial write is finished before anything
// else goes out) and signals the complete eventfds. A request is released from the table once its
// answer is out; the time from taking it to that moment is its service time.
//
// Thread safety: one thread, the server loop's. The Post function hands work to the engine's
// workers, whose completions the loop brings back here.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_VCPU_FAULTS_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_VCPU_FAULTS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/latency_histogram.h"
#include "guestmem/exitless_ring.h"
#include "guestmem/fault_handler.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"
#include "guestmem/vcpu_fault_frames.h"
#include "serve/vcpu_requests.h"

namespace guestmem::cli {

class VcpuFaults {
 public:
  using Clock = std::chrono::steady_clock;
  // Posts a guest fault to the VM's space; `slot` names it when it is done.
  using PostFn = std::function<Status(const GuestFault& fault, uint32_t slot)>;

  // Frames read from one socket per turn.
  static constexpr size_t kFramesPerTurn = 64;

  // `uffd_socket` is the VM's connection (not owned).
  VcpuFaults(std::string name, int uffd_socket, std::unique_ptr<VcpuRequestTable> table);
  ~VcpuFaults();
  VcpuFaults(const VcpuFaults&) = delete;
  VcpuFaults& operator=(const VcpuFaults&) = delete;

  const VcpuRequestTable& table() const { return *table_; }

  // --- message 2: set up the rings it announced (3 descriptors per vCPU: notify, complete, vCPU
  // fd), each mapped and its header checked. ERRORS: ExitlessRing::Map's, naming the vCPU.
  Status SetUpExitless(std::vector<UniqueFd> fds);
  size_t ring_count() const { return rings_.size(); }
  int ring_notify_fd(size_t index) const;
  // The descriptors of every ring, in message 2's order (for the keeper).
  std::vector<int> ring_fds() const;

  // --- the APF socket
  void AttachApf(UniqueFd socket);
  void DetachApf();  // it hung up: the VM goes on without it
  int apf_fd() const { return apf_.get(); }

  struct ReadOutcome {
    bool more = false;     // the budget ran out with frames waiting: read again soon
    bool hung_up = false;  // EOF: the peer closed the socket
  };
  // Takes whole frames from the channel's socket (kUffdSocket or kApfSocket): at most `budget`,
  // as long as the table has room. ERRORS: kProtocolError for a malformed frame (naming the socket
  // and what is wrong), a frame without gpa, descriptors on a frame; Post's errors; recv's as
  // PosixError.
  Result<ReadOutcome> ReadFrames(VcpuChannel channel, size_t budget, const PostFn& post);
  // Drains ring `index`: consumes and posts what it holds (as room allows), then arms it. Returns
  // true when it was busy and should be drained again soon; a ring held back for want of room
  // comes back through TakeUnblocked().
  Result<bool> DrainRing(size_t index, const PostFn& post);
  // Reads the notify eventfd of ring `index` (the kernel's signal), so that it can signal again.
  void AcknowledgeNotify(size_t index);

  // The space served the fault posted as `slot`: queue its answer.
  void Complete(uint32_t slot);
  // Writes queued replies and signals complete eventfds. ERRORS: kPeerGone when the Uffd socket
  // hung up (EPIPE, ECONNRESET); send's others as PosixError.
  struct FlushOutcome {
    bool queued = false;    // replies wait for the socket to take them: call again when writable
    bool apf_gone = false;  // the APF socket hung up: detach it
  };
  Result<FlushOutcome> FinishBatch();
  // Completions waiting for room in a full complete ring (retried by FinishBatch).
  bool completions_waiting() const;
  // Channels (and rings) that had to stop for want of room and may go on now that answers went
  // out: ring indexes, and whether each socket should be read again.
  struct Unblocked {
    bool uffd_socket = false;
    bool apf_socket = false;
    std::vector<size_t> rings;
  };
  Unblocked TakeUnblocked();

  // Posts again what a predecessor took and did not answer (from the table it left): every
  // socket request (a reply that was in fact sent costs the vCPU one spurious round trip), and
  // every ring notification the ring no longer holds. Returns how many were posted.
  Result<size_t> Replay(const PostFn& post);

  // "vCPU faults: socket 12, APF 3, exitless 40; service p50 31us p99 80us max 120us", or "".
  std::string StatsNote() const;
  uint64_t answered() const { return answered_socket_ + answered_apf_ + answered_exitless_; }

 private:
  struct Ring;
  struct Outgoing {
    Frame frame;
    uint32_t slot = 0;
    size_t written = 0;
  };
  struct Output {
    std::deque<Outgoing> queue;
  };

  int SocketOf(VcpuChannel channel) const;
  Output& OutputOf(VcpuChannel channel);
  // Writes what `out` holds to `fd`; true if bytes remain.
  Result<bool> Write(int fd, Output& out);
  void Answered(uint32_t slot);

  const std::string name_;
  const int uffd_socket_;
  UniqueFd apf_;
  std::unique_ptr<VcpuRequestTable> table_;
  std::vector<std::unique_ptr<Ring>> rings_;
  Output uffd_out_;
  Output apf_out_;
  std::vector<Clock::time_point> taken_at_;  // per slot
  bool uffd_blocked_ = false;
  bool apf_blocked_ = false;
  LatencyHistogram service_;
  uint64_t answered_socket_ = 0;
  uint64_t answered_apf_ = 0;
  uint64_t answered_exitless_ = 0;
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_VCPU_FAULTS_H_
