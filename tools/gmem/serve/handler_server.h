// HandlerServer: the `gmem serve` daemon — a Firecracker-compatible page-fault handler.
//
// It listens on a Unix socket; each VM that restores from the memory file connects once and sends
// Firecracker's Uffd handshake (the regions as JSON and the uffd as SCM_RIGHTS; or the
// secret-hiding variant with the guest memory file and a bitmap as well). Each handshake is
// validated; a bad one is logged with its reason and only that connection is closed. A good one
// becomes a space of the fault engine, served until the VM hangs up (its socket closes when
// Firecracker exits) or its space ends by itself (the VM's process is gone, or it can no longer
// be served), then freed and logged with its statistics.
//
// One thread, Run()'s, owns every connection: an epoll loop accepts, reads handshakes from
// non-blocking sockets (each connection a small state machine with its own deadline and a buffer
// that grows only with what arrived, at most the handshake limit), admits VMs and notices
// hang-ups. The fault engine's workers serve the faults. Nothing a client does decides how many
// threads run: connections waiting for their handshake are bounded (beyond the bound they are
// accepted and closed), and so are VMs served at once. Out of descriptors (EMFILE), the server
// sheds the pending connection with a reserve descriptor and stops accepting for a moment
// instead of spinning; repeated log lines are folded (RateLimitedLog).
//
// A restart loses no VM. Each VM admitted is also given to the daemon's keeper (keeper.h): its
// uffd, its connection, the memfd of its page tracker (served and ballooned pages) and its guest
// memory file. A daemon that starts takes over whatever its keeper holds — the VMs of a
// predecessor that was stopped or killed, even by SIGKILL — resumes serving each (every region
// woken: the faults the predecessor had read died with it) and takes the listening socket the
// keeper kept, so that VMs that connected meanwhile wait in its backlog. At shutdown, VMs still
// connected are left to the keeper for the next daemon; with none left, the keeper ends.
//
// Secret hiding (Firecracker's feature/secret-hiding branch; docs/secret-hiding.md). A VM that
// sends three descriptors (uffd, guest_memfd, userfault bitmap) is served with the full minor
// trap, its bitmap mapped: a page's bit is cleared once its content is in the guest memory file,
// whichever way it went in. After message 1 its connection carries message 2 (apf_control.h) and
// then its vCPUs' faults as FaultRequest frames (vcpu_fault_frames.h), which the loop reads and
// answers (serve/vcpu_faults.h) while the engine's workers populate the pages. With `apf`, the
// server also listens on dirname(socket)/apf.socket, where Firecracker connects before it connects
// to the socket: an APF connection is paired with the VM whose connection comes from the same
// process (SO_PEERCRED), and carries the same frames. Exitless APF rings announced in message 2
// are drained from the loop too. The pages a VM had populated when it ended are its snapshot's
// working set: the next VM of the snapshot gets them before its vCPUs ask. Everything taken and not
// answered yet is in a table the keeper holds, so that a successor answers it. A malformed frame is
// a protocol error of that VM alone: logged, and its connection dropped.
//
// Thread safety: Start() from one thread; Stop() from any thread or a signal handler
// (async-signal-safe); Run() from one thread.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_H_

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "guestmem/fault_handler.h"
#include "guestmem/object_store.h"
#include "guestmem/result.h"
#include "serve/endpoints.h"

namespace guestmem::cli {

struct ServeOptions {
  std::string socket_path;
  std::string mem_file_path;
  // Installed beyond faults' windows: everything at the first fault (kAtFirstFault,
  // Firecracker's fault_all), or everything not yet served in the background after the working
  // set, at fill_bytes_per_second (kBackground; a secret-hiding VM's once its message 2 is in).
  FillMode fill = FillMode::kNone;
  uint64_t fill_bytes_per_second = kDefaultFillBytesPerSecond;
  uint64_t fault_around_bytes = kDefaultFaultAroundBytes;
  unsigned workers = 0;  // 0: the engine's default
  mode_t socket_mode = 0600;
  std::optional<uid_t> socket_owner;
  std::optional<gid_t> socket_group;
  // Peers allowed to connect, by SO_PEERCRED, on top of the socket file's mode: a peer whose uid
  // is in allow_uids, or whose primary or a supplementary gid is in allow_gids. Both empty:
  // whoever the mode lets in.
  std::vector<uid_t> allow_uids;
  std::vector<gid_t> allow_gids;
  std::chrono::milliseconds handshake_timeout{5000};
  // Connections accepted whose handshake is not complete yet; more are accepted and closed.
  size_t max_pending_handshakes = 256;
  // VMs served at once; a handshake beyond it is rejected.
  size_t max_active_vms = 1024;
  int max_vms = 0;  // exit after this many VMs have come and gone (0: serve forever)
  // Also listen on ApfSocketPath(socket_path) (apf_control.h) for Firecracker's APF socket (with
  // the socket's mode, owner and group).
  bool apf = false;
  // Keep every VM with a keeper, so that a successor can take it over (see above). The keeper
  // listens at keeper_path (default: socket_path + ".keeper") and is `keeper_program keeper
  // PATH`, started when none runs there.
  bool keeper = true;
  // Where what is learnt about snapshots (their zero maps and working sets) is kept between
  // runs; empty: SnapshotCache::DefaultDirectory().
  std::string cache_dir;
  // Learn each snapshot's working set from its restores and prefetch it on the next ones, from
  // the handshake on (a secret-hiding VM: from its message 2, once its bitmap is Firecracker's),
  // so that its faults — vCPU exits, for secret hiding — do not come for those pages.
  bool learn = true;
  // A packed snapshot's decompressed chunks kept in memory, shared by its VMs.
  uint64_t chunk_cache_bytes = uint64_t{256} << 20;
  // A snapshot named by a URL (s3://, http://, https://: object_store.h): how the store is
  // reached (AWS_* variables), the chunks fetched kept on disk in cache_dir/chunks (at most
  // chunk_disk_bytes), each fetch bounded by fetch_deadline (past it its pages are poisoned), and
  // the threads that fetch (and decode) chunks, each with a request in flight.
  ObjectStoreOptions object_store = ObjectStoreOptions::FromEnvironment();
  uint64_t chunk_disk_bytes = uint64_t{10} << 30;
  std::chrono::milliseconds fetch_deadline{10000};
  unsigned fetch_threads = 8;
  std::string keeper_path;
  std::string keeper_program = "/proc/self/exe";
  // A listening socket to serve on instead of making one at socket_path (systemd's socket
  // activation: LISTEN_FDS); the server takes it (made non-blocking) and leaves the socket file
  // to whoever made it. -1: listen on socket_path.
  int listen_fd = -1;
  // Prometheus' exposition over HTTP at this address (endpoints.h); none when unset.
  std::optional<MetricsAddress> metrics_address;
  // Where each VM's restore trace is written (restore_trace.h), one file per VM; empty: none.
  // An existing directory the daemon may write (`gmem serve` checks at start; a trace that cannot
  // be made there is logged and its VM served without one).
  std::string trace_dir;
  // `gmem status`'s control socket (endpoints.h); empty: none.
  std::string control_path;
  // Told when a served VM has gone, with its final statistics (from Run()'s thread).
  std::function<void(const std::string& vm, const FaultStats& stats)> on_vm_finished;
};

// Fault-serving threads the server starts at most.
inline constexpr unsigned kMaxWorkers = 256;
// A background fill's rate (--fill-rate-mib): 1 MiB/s to 1 TiB/s.
inline constexpr uint64_t kMinFillBytesPerSecond = uint64_t{1} << 20;
inline constexpr uint64_t kMaxFillBytesPerSecond = uint64_t{1} << 40;

// Checks what does not depend on the machine, so that a daemon that could serve no VM never
// starts: paths not empty, fault_around_bytes a power of two from kMinFaultAroundBytes to
// kMaxFaultAroundBytes, fill_bytes_per_second from kMinFillBytesPerSecond to
// kMaxFillBytesPerSecond, handshake_timeout > 0, workers <= kMaxWorkers, both bounds > 0.
// ERRORS: kInvalidArgument naming the command-line option.
Status ValidateServeOptions(const ServeOptions& options);

class HandlerServer {
 public:
  // Validates the options, opens the memory file (a regular file or a block device: a FIFO or
  // anything else is refused without waiting for a writer) and listens on the socket.
  static Result<std::unique_ptr<HandlerServer>> Start(const ServeOptions& options);
  ~HandlerServer();

  // Serves until Stop() or, with max_vms, until that many VMs have finished. Then closes every
  // connection, frees every space and removes the socket file.
  Status Run();
  // Asks Run() to return. Async-signal-safe.
  void Stop();
  // Where the metrics are served (the port chosen for port 0), if they are.
  std::optional<MetricsAddress> metrics_address() const;

 private:
  struct Impl;
  explicit HandlerServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_HANDLER_SERVER_H_
