// HandlerServer::Impl: the `gmem serve` loop's state, shared by the files that implement it by
// job: handler_server.cc (the loop, accepting, handshakes, taking over, the end of a VM),
// vcpu_channels.cc (a secret-hiding VM's message 2, frames, rings and answers) and
// apf_pairing.cc (the APF socket: accepting its connections and pairing each with its VM).
// Private to those files; see handler_server.h for what the server does.
//
// Thread safety: Run()'s thread owns everything but `mu`'s members, which the engine's workers
// post to.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_IMPL_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_IMPL_H_

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/handshake.h"
#include "guestmem/log.h"
#include "guestmem/page_source.h"
#include "guestmem/page_tracker.h"
#include "guestmem/remote_pack_storage.h"
#include "guestmem/result.h"
#include "guestmem/snapshot.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/unique_fd.h"
#include "guestmem/unix_socket.h"
#include "guestmem/working_set.h"
#include "guestmem/working_set_learner.h"
#include "serve/endpoints.h"
#include "serve/handler_server.h"
#include "serve/keeper.h"
#include "serve/serve_metrics.h"
#include "serve/vcpu_faults.h"
#include "serve/vcpu_requests.h"

namespace guestmem::cli {

using Clock = std::chrono::steady_clock;

// epoll tokens of the server's own descriptors; connections use their number (from 1), and a
// connection's other descriptors its number with a kind and an index above it.
constexpr uint64_t kStopToken = UINT64_MAX;
constexpr uint64_t kNoticeToken = UINT64_MAX - 1;
constexpr uint64_t kListenerToken = UINT64_MAX - 2;
constexpr uint64_t kApfListenerToken = UINT64_MAX - 3;

enum class TokenKind : uint64_t {
  kConnection = 0,  // the VM's Uffd socket
  kApfSocket = 1,   // the VM's APF socket
  kRingNotify = 2,  // the notify eventfd of one of the VM's exitless rings (index: the vCPU)
  kWaitingApf = 3,  // an APF connection whose VM has not connected yet (number: its own)
};
constexpr int kTokenKindShift = 56;
constexpr int kTokenIndexShift = 40;
constexpr uint64_t kTokenNumberMask = (uint64_t{1} << kTokenIndexShift) - 1;

inline uint64_t Token(TokenKind kind, uint64_t number, uint64_t index = 0) {
  return (static_cast<uint64_t>(kind) << kTokenKindShift) | (index << kTokenIndexShift) | number;
}
inline TokenKind KindOf(uint64_t token) { return static_cast<TokenKind>(token >> kTokenKindShift); }
inline uint64_t NumberOf(uint64_t token) { return token & kTokenNumberMask; }
inline uint64_t IndexOf(uint64_t token) {
  return (token >> kTokenIndexShift) & ((uint64_t{1} << (kTokenKindShift - kTokenIndexShift)) - 1);
}

constexpr int kAcceptsPerTurn = 64;
// How often folded log lines are reported while they keep coming.
constexpr std::chrono::seconds kLogFoldWindow{5};

// Wakes whoever waits on the eventfd `fd`.
inline void SignalEventFd(int fd) {
  uint64_t one = 1;
  ssize_t rc = write(fd, &one, sizeof(one));
  (void)rc;  // EAGAIN: the counter is already non-zero, the loop wakes anyway
}

// Resets the eventfd `fd`.
inline void DrainEventFd(int fd) {
  uint64_t count;
  ssize_t rc = read(fd, &count, sizeof(count));
  (void)rc;
}

struct HandlerServer::Impl {
  enum class Phase {
    kHandshake,  // reading the handshake, until its deadline
    kServing,    // a space of the engine
    kClosing,    // the socket hung up and the space had ended by itself: its notice is due
  };

  // Message 2 of a secret-hiding VM: not read yet, or what it said.
  enum class Control { kAwaiting, kNoExitless, kExitless };

  struct Connection {
    uint64_t vm = 0;
    std::string name;
    UniqueFd socket;
    std::optional<pid_t> pid;  // the peer's, to pair its APF connection with it
    Phase phase = Phase::kHandshake;
    Clock::time_point accepted;
    Clock::time_point deadline;             // kHandshake
    std::optional<HandshakeReader> reader;  // kHandshake
    UniqueFd early_apf;                     // its APF connection, paired before it was admitted
    SpaceId space = 0;                      // kServing, kClosing
    // A secret-hiding VM (guest memory file and userfault bitmap), kServing: its vCPU faults.
    std::unique_ptr<VcpuFaults> vcpu;
    Control control = Control::kAwaiting;
    // Taken over with message 2 kept: a predecessor that died before consuming it left it on the
    // socket, in front of the frames.
    bool control_may_linger = false;
    // What the keeper is given whenever this VM's descriptors change: the description and copies
    // of the descriptors that do not change (the socket, the APF socket and the rings are added).
    nlohmann::json description;
    std::vector<std::pair<std::string, UniqueFd>> kept_fds;
    // What the VM's faults needed, learned from when it ends well (kServing, kClosing; null
    // when not learning), and the snapshot it restores.
    std::shared_ptr<WorkingSetRecorder> recorder;
    std::shared_ptr<const Snapshot> snapshot;
    // Secret hiding: the working set to prefetch once message 2 is in, and whether a background
    // fill follows it then.
    std::shared_ptr<const WorkingSet> deferred_prefetch;
    // Pages of the learned working set it was given to prefetch (0: none).
    size_t learned_pages = 0;
    bool deferred_fill = false;
  };

  // An APF connection whose VM (the Uffd connection from the same process) has not come yet.
  struct WaitingApf {
    UniqueFd socket;
    pid_t pid = 0;
    Clock::time_point deadline;
  };

  // Posted by the engine's workers when a vCPU fault posted for a VM has been served.
  struct GuestFaultDone {
    uint64_t vm;
    uint32_t slot;
    Status status;
  };

  // Posted by the engine's workers when a space ends by itself.
  struct SpaceEnded {
    uint64_t vm;
    SpaceId space;
    Status why;
    FaultStats stats;
  };

  ServeOptions options;
  // The memory file as new VMs see it; VMs being served keep the source they started with.
  std::shared_ptr<const Snapshot> source;
  UniqueFd listener;
  UniqueFd epoll;
  UniqueFd stop_fd;    // eventfd: Stop() was called
  UniqueFd notice_fd;  // eventfd: a space ended by itself
  UniqueFd reserve;    // /dev/null, given up to shed a connection when out of descriptors

  std::mutex mu;
  std::vector<SpaceEnded> ended;           // GUARDED_BY(mu)
  std::vector<GuestFaultDone> guest_done;  // GUARDED_BY(mu)
  std::atomic<bool> notice_lost{false};    // a notice could not be posted: reconcile

  // The loop's own state (Run()'s thread only).
  std::unordered_map<uint64_t, Connection> connections;
  std::set<std::pair<Clock::time_point, uint64_t>> deadlines;  // of the kHandshake connections
  std::unordered_map<pid_t, uint64_t> vm_by_pid;  // live connections, by their peer's pid
  // --apf: the APF socket's listener, and APF connections waiting for their VM.
  UniqueFd apf_listener;
  std::string apf_path;
  std::unordered_map<uint64_t, WaitingApf> waiting_apf;
  std::unordered_map<pid_t, uint64_t> waiting_apf_by_pid;
  std::set<std::pair<Clock::time_point, uint64_t>> apf_deadlines;
  uint64_t next_waiting_apf = 1;
  // Edge-triggered descriptors (a VM's sockets, its rings) with more to read than a turn took, or
  // held back until answers went out: read again without waiting for epoll.
  std::vector<uint64_t> ready;
  // VMs with exitless completions waiting for room in a full complete ring.
  std::set<uint64_t> completion_retry;
  uint64_t next_vm = 1;
  size_t pending_handshakes = 0;  // connections in kHandshake
  size_t active_vms = 0;          // connections in kServing or kClosing
  int finished_vms = 0;
  bool listener_watched = true;
  Clock::time_point listener_resumes;
  RateLimitedLog accept_log{kLogFoldWindow};
  RateLimitedLog refused_log{kLogFoldWindow};
  RateLimitedLog denied_log{kLogFoldWindow};
  RateLimitedLog apf_log{kLogFoldWindow};

  // Where zero maps and working sets are kept between runs; none when the directory cannot be used.
  std::optional<SnapshotCache> cache;
  std::optional<RemoteAccess> remote;  // made when a snapshot named by a URL is first opened
  // Working sets learned per snapshot (none with ServeOptions::learn off).
  std::optional<WorkingSetLearner> learner;
  // Holds every VM for a successor (null with ServeOptions::keeper off).
  std::unique_ptr<KeeperClient> keeper;
  Inheritance inherited;      // what the keeper held at start, until resumed
  bool handing_over = false;  // shutting down: VMs stay kept for the next daemon
  size_t left_to_keeper = 0;

  bool socket_activated = false;  // the listener came from ServeOptions::listen_fd

  // Declared after what they use: its workers call OnSpaceClosed, which uses the above.
  std::unique_ptr<FaultEngine> engine;
  // What the VMs did, for the endpoints, which read it (and the engine) from threads of their
  // own; stopped before the engine goes (~HandlerServer).
  std::unique_ptr<ServeMetrics> metrics;
  std::unique_ptr<MetricsHttpServer> metrics_http;
  std::unique_ptr<ControlServer> control_server;

  // What a VM is served with, from a handshake or from the keeper.
  struct VmSpec {
    std::string name;
    std::vector<HandshakeRegion> regions;
    std::shared_ptr<const Snapshot> snapshot;
    FillMode fill = FillMode::kNone;
    uint64_t fill_bytes_per_second = kDefaultFillBytesPerSecond;
    uint64_t fault_around_bytes = kDefaultFaultAroundBytes;
    UniqueFd uffd;
    UniqueFd memory_file;                  // the secret-hiding variant's guest memory file
    std::shared_ptr<PageTracker> tracker;  // taken over; null: a new shared one
    UniqueFd bitmap;                       // the secret-hiding variant's userfault bitmap
    bool resume = false;
    std::string kept_name;  // the name the keeper's description gives (name: with a note)
  };

  Status Watch(int fd, uint64_t token, uint32_t events);
  void PauseListener(Clock::time_point now);
  void ResumeListenerIfDue(Clock::time_point now);
  void AcceptReady(Clock::time_point now);
  void ShedOnePendingConnection(int err);
  bool Allowed(const std::optional<PeerCredentials>& peer) const;
  void AddConnection(UniqueFd socket, Clock::time_point now);
  void HandshakeReady(Connection& c);
  Result<SpaceId> Admit(Connection& c, ReceivedHandshake& handshake);
  // Makes the VM's handler and space; fills c's description and kept descriptors (what the keeper
  // needs to hold it) and, for a VM with a userfault bitmap, its vCPU faults (c.vcpu).
  Result<SpaceId> StartSpace(Connection& c, VmSpec spec,
                             std::unique_ptr<VcpuRequestTable> requests = nullptr);
  // A restore trace for c in --trace-dir; null (logged) when it cannot be made.
  std::shared_ptr<RestoreTraceWriter> OpenTrace(const Connection& c, const Snapshot& snapshot);
  // Gives the keeper everything it must hold for c now (replacing what it held).
  void KeepVm(Connection& c);
  // Makes c's sockets and rings edge-triggered members of the epoll set.
  Status WatchServing(Connection& c);
  void UnwatchServing(Connection& c);
  VcpuFaults::PostFn PostFor(const Connection& c);
  void OnGuestFaultDone(uint64_t vm, uint32_t slot, const Status& status);
  // After message 2: starts the prefetch of the working set learned for c's snapshot, if any,
  // and the background fill, if the VM has one.
  void StartBackgroundWork(Connection& c);
  // A VM's Uffd socket, APF socket or ring had an event (or is in `ready`).
  void VcpuSocketReady(Connection& c, VcpuChannel channel, uint32_t events);
  void RingReady(Connection& c, size_t index);
  // Reads message 2; true once it has been read (or is not due).
  bool ReadControl(Connection& c);
  // A hang-up (kPeerGone) ends c as a hang-up; any other error drops it, logged.
  void EndForError(Connection& c, const Error& error);
  // Writes what c's vCPU faults queued; false when c was dropped (or hung up) meanwhile.
  bool FinishVcpuBatch(Connection& c);
  void DetachApf(Connection& c, const char* why);
  void ProcessReady();
  void AcceptApfReady(Clock::time_point now);
  void AddApfConnection(UniqueFd socket, Clock::time_point now);
  void AttachApf(Connection& c, UniqueFd socket);
  void EraseWaitingApf(uint64_t id);
  // An event of `token` (again: it was in `ready`, not reported by epoll).
  void TokenReady(uint64_t token, uint32_t events, bool again);
  void DropForToken(uint64_t token, const std::string& why);
  Status TakeOverFromKeeper();
  Status Resume(KeptVm& kept);
  Result<std::shared_ptr<const Snapshot>> CurrentSource();
  // Opens a snapshot with its zero map (kept in the cache, or found by a scan).
  Result<std::shared_ptr<const Snapshot>> OpenSnapshot(const std::string& path);
  Result<RemoteAccess> OpenRemoteAccess() const;
  void ServingReady(Connection& c, uint32_t events);
  void ExpireHandshakes(Clock::time_point now);
  // Logs why c's handshake was rejected and counts it by reason.
  void Reject(Connection& c, RejectReason reason, const std::string& why);
  void HandleNotices();
  void Reconcile();
  void SpaceEndedByItself(Connection& c, const SpaceEnded& notice);
  void Hangup(Connection& c, const char* why);
  void Drop(uint64_t vm, const std::string& why);
  void Finish(Connection& c, LogLevel level, const std::string& line, const FaultStats& stats);
  void SetPhase(Connection& c, Phase phase);
  void Erase(uint64_t vm);
  void OnSpaceClosed(uint64_t vm, SpaceId space, const Status& why, const FaultStats& stats);
  std::optional<Clock::time_point> NextWake() const;
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_IMPL_H_
