#include "serve/handler_server.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/log.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/page_tracker.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/working_set_learner.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/zero_map.h"
#include "serve/keeper.h"

namespace guestmem::cli {
namespace {

using Clock = std::chrono::steady_clock;

// epoll tokens of the server's own descriptors; connections use their number (from 1).
constexpr uint64_t kStopToken = UINT64_MAX;
constexpr uint64_t kNoticeToken = UINT64_MAX - 1;
constexpr uint64_t kListenerToken = UINT64_MAX - 2;

constexpr int kEventsPerTurn = 64;
constexpr int kAcceptsPerTurn = 64;
// Bytes read (and dropped) per turn from a VM's socket after its handshake.
constexpr size_t kDiscardBytesPerTurn = 4096;
// How long the listener rests when accept fails for want of descriptors or memory.
constexpr std::chrono::milliseconds kAcceptBackoff{100};
// How often folded log lines are reported while they keep coming.
constexpr std::chrono::seconds kLogFoldWindow{5};

std::string Seconds(Clock::duration d) {
  char buf[32];
  (void)std::snprintf(buf, sizeof(buf), "%.3fs", std::chrono::duration<double>(d).count());
  return buf;
}

std::string PeerName(uint64_t vm, const std::optional<PeerCredentials>& peer) {
  std::string name = "vm " + std::to_string(vm);
  if (peer) {
    name += " (pid " + std::to_string(peer->pid) + ", uid " + std::to_string(peer->uid) + ", gid " +
            std::to_string(peer->gid) + ")";
  } else {
    name += " (peer unknown)";
  }
  return name;
}

void Signal(int fd) {
  uint64_t one = 1;
  ssize_t rc = write(fd, &one, sizeof(one));
  (void)rc;  // EAGAIN: the counter is already non-zero, the loop wakes anyway
}

void Drain(int fd) {
  uint64_t count;
  ssize_t rc = read(fd, &count, sizeof(count));
  (void)rc;
}

// "; peers allowed: uid 107, 108; gid 36" when access is restricted, else "".
std::string AccessNote(const ServeOptions& options) {
  if (options.allow_uids.empty() && options.allow_gids.empty()) return "";
  auto join = [](const char* what, const auto& ids) {
    std::string out;
    for (auto id : ids) out += (out.empty() ? std::string(what) + " " : ", ") + std::to_string(id);
    return out;
  };
  const std::string uids = join("uid", options.allow_uids);
  const std::string gids = join("gid", options.allow_gids);
  return "; peers allowed: " + uids + (!uids.empty() && !gids.empty() ? "; " : "") + gids;
}

int TimeoutMs(Clock::time_point now, std::optional<Clock::time_point> wake) {
  if (!wake) return -1;
  if (*wake <= now) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(*wake - now).count();
  return static_cast<int>(std::min<int64_t>(ms, 60'000));
}

}  // namespace

struct HandlerServer::Impl {
  enum class Phase {
    kHandshake,  // reading the handshake, until its deadline
    kServing,    // a space of the engine
    kClosing,    // the socket hung up and the space had ended by itself: its notice is due
  };

  struct Connection {
    uint64_t vm = 0;
    std::string name;
    UniqueFd socket;
    Phase phase = Phase::kHandshake;
    Clock::time_point accepted;
    Clock::time_point deadline;             // kHandshake
    std::optional<HandshakeReader> reader;  // kHandshake
    SpaceId space = 0;                      // kServing, kClosing
    // What the VM's faults needed, learned from when it ends well (kServing, kClosing; null
    // when not learning).
    std::shared_ptr<WorkingSetRecorder> recorder;
    std::shared_ptr<const RawFileSource> snapshot;
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
  std::shared_ptr<const RawFileSource> source;
  UniqueFd listener;
  UniqueFd epoll;
  UniqueFd stop_fd;    // eventfd: Stop() was called
  UniqueFd notice_fd;  // eventfd: a space ended by itself
  UniqueFd reserve;    // /dev/null, given up to shed a connection when out of descriptors

  std::mutex mu;
  std::vector<SpaceEnded> ended;         // GUARDED_BY(mu)
  std::atomic<bool> notice_lost{false};  // a notice could not be posted: reconcile

  // The loop's own state (Run()'s thread only).
  std::unordered_map<uint64_t, Connection> connections;
  std::set<std::pair<Clock::time_point, uint64_t>> deadlines;  // of the kHandshake connections
  uint64_t next_vm = 1;
  size_t pending_handshakes = 0;  // connections in kHandshake
  size_t active_vms = 0;          // connections in kServing or kClosing
  int finished_vms = 0;
  bool listener_watched = true;
  Clock::time_point listener_resumes;
  RateLimitedLog accept_log{kLogFoldWindow};
  RateLimitedLog refused_log{kLogFoldWindow};
  RateLimitedLog denied_log{kLogFoldWindow};

  // Where zero maps are kept between runs; none when the directory cannot be used.
  std::optional<SnapshotCache> cache;
  // Working sets learned per snapshot (none with ServeOptions::learn off).
  std::optional<WorkingSetLearner> learner;
  // Holds every VM for a successor (null with ServeOptions::keeper off).
  std::unique_ptr<KeeperClient> keeper;
  Inheritance inherited;      // what the keeper held at start, until resumed
  bool handing_over = false;  // shutting down: VMs stay kept for the next daemon
  size_t left_to_keeper = 0;

  // Declared last, so destroyed first: its workers call OnSpaceClosed, which uses the above.
  std::unique_ptr<FaultEngine> engine;

  // What a VM is served with, from a handshake or from the keeper.
  struct VmSpec {
    std::string name;
    std::vector<HandshakeRegion> regions;
    std::shared_ptr<const RawFileSource> snapshot;
    bool fault_all = false;
    uint64_t fault_around_bytes = kDefaultFaultAroundBytes;
    UniqueFd uffd;
    UniqueFd memory_file;                  // the secret-hiding variant's guest memory file
    std::shared_ptr<PageTracker> tracker;  // taken over; null: a new shared one
    bool resume = false;
  };

  Status Watch(int fd, uint64_t token, uint32_t events);
  void PauseListener(Clock::time_point now);
  void ResumeListenerIfDue(Clock::time_point now);
  void AcceptReady(Clock::time_point now);
  void ShedOnePendingConnection(int err);
  bool Allowed(const std::optional<PeerCredentials>& peer) const;
  void AddConnection(UniqueFd socket, Clock::time_point now);
  void ConnectionReady(uint64_t vm, uint32_t events);
  void HandshakeReady(Connection& c);
  Result<SpaceId> Admit(Connection& c, ReceivedHandshake& handshake);
  // Makes the VM's handler and space; *kept gets what the keeper needs to hold it.
  Result<SpaceId> StartSpace(uint64_t vm, VmSpec spec, KeptVm* kept);
  Status TakeOverFromKeeper();
  Status Resume(KeptVm& kept);
  Result<std::shared_ptr<const RawFileSource>> CurrentSource();
  // Opens a snapshot with its zero map (kept in the cache, or found by a scan).
  Result<std::unique_ptr<RawFileSource>> OpenSnapshot(const std::string& path);
  void ServingReady(Connection& c, uint32_t events);
  void ExpireHandshakes(Clock::time_point now);
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

Status ValidateServeOptions(const ServeOptions& options) {
  auto invalid = [](const std::string& what) { return Error(ErrorCode::kInvalidArgument, what); };
  if (options.socket_path.empty()) return invalid("the socket path is empty");
  if (options.mem_file_path.empty()) return invalid("the memory file path is empty");
  const uint64_t window = options.fault_around_bytes;
  if (!IsPowerOfTwo(window) || window < kMinFaultAroundBytes || window > kMaxFaultAroundBytes) {
    return invalid("--fault-around-kib " + std::to_string(window / 1024) +
                   (window % 1024 != 0 ? " (" + std::to_string(window) + " bytes)" : "") +
                   ": must be a power of two from " + std::to_string(kMinFaultAroundBytes / 1024) +
                   " to " + std::to_string(kMaxFaultAroundBytes / 1024) + " KiB");
  }
  if (options.handshake_timeout.count() <= 0) {
    return invalid("--handshake-timeout-ms " + std::to_string(options.handshake_timeout.count()) +
                   ": must be at least 1 ms");
  }
  if (options.workers > kMaxWorkers) {
    return invalid("--workers " + std::to_string(options.workers) + ": at most " +
                   std::to_string(kMaxWorkers) + " (0: one per CPU)");
  }
  if (options.max_pending_handshakes == 0) {
    return invalid("--max-pending-handshakes 0: at least one connection must be able to wait");
  }
  if (options.max_active_vms == 0) return invalid("--max-active-vms 0: at least one VM");
  return OkStatus();
}

Result<std::unique_ptr<HandlerServer>> HandlerServer::Start(const ServeOptions& options) {
  GM_RETURN_IF_ERROR(ValidateServeOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const std::string cache_dir =
      options.cache_dir.empty() ? SnapshotCache::DefaultDirectory() : options.cache_dir;
  if (auto cache = SnapshotCache::Open(cache_dir); cache) {
    impl->cache.emplace(std::move(*cache));
  } else {
    Log(LogLevel::kWarning, "the cache " + cache_dir + " cannot be used (" +
                                cache.error().ToString() +
                                "): each start scans the snapshot for its zero pages");
  }
  if (options.learn) impl->learner.emplace(impl->cache ? &*impl->cache : nullptr);
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> source,
                      impl->OpenSnapshot(options.mem_file_path));
  impl->source = std::move(source);
  GM_ASSIGN_OR_RETURN(impl->engine, FaultEngine::Start({.workers = options.workers}));
  impl->epoll.reset(epoll_create1(EPOLL_CLOEXEC));
  if (!impl->epoll) return PosixError(errno, "serve: epoll_create1");
  impl->stop_fd.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  impl->notice_fd.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->stop_fd || !impl->notice_fd) return PosixError(errno, "serve: eventfd");
  impl->reserve.reset(open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!impl->reserve) return PosixError(errno, "serve: opening the reserve descriptor /dev/null");
  if (options.keeper) {
    const std::string path =
        options.keeper_path.empty() ? options.socket_path + ".keeper" : options.keeper_path;
    GM_ASSIGN_OR_RETURN(impl->keeper, KeeperClient::Open(path, options.keeper_program));
    auto inheritance = impl->keeper->TakeOver();
    if (!inheritance && inheritance.error().code() == ErrorCode::kFailedPrecondition) {
      return Error(ErrorCode::kFailedPrecondition, "another gmem serve serves " +
                                                       options.socket_path +
                                                       " (it owns the keeper at " + path + ")");
    }
    if (!inheritance) return std::move(inheritance).error();
    impl->inherited = std::move(*inheritance);
  }
  struct stat socket_file {};
  if (impl->inherited.listener && stat(options.socket_path.c_str(), &socket_file) == 0 &&
      S_ISSOCK(socket_file.st_mode)) {
    // The socket a predecessor listened on, kept: VMs that connected meanwhile are in its backlog.
    impl->listener = std::move(impl->inherited.listener);
  } else {
    UnixListenOptions listen;
    listen.mode = options.socket_mode;
    listen.owner = options.socket_owner;
    listen.group = options.socket_group;
    listen.backlog = 256;
    GM_ASSIGN_OR_RETURN(impl->listener, ListenUnix(options.socket_path, listen));
    if (impl->keeper != nullptr)
      GM_RETURN_IF_ERROR(impl->keeper->KeepListener(impl->listener.get()));
  }
  GM_RETURN_IF_ERROR(impl->Watch(impl->stop_fd.get(), kStopToken, EPOLLIN));
  GM_RETURN_IF_ERROR(impl->Watch(impl->notice_fd.get(), kNoticeToken, EPOLLIN));
  GM_RETURN_IF_ERROR(impl->Watch(impl->listener.get(), kListenerToken, EPOLLIN));
  GM_RETURN_IF_ERROR(impl->TakeOverFromKeeper());

  char mode[8];
  (void)std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(options.socket_mode));
  Log(LogLevel::kInfo,
      "serving " + impl->source->Describe() + " on " + options.socket_path + " (mode " + mode +
          ") with " + std::to_string(impl->engine->worker_count()) + " workers, " +
          (options.fault_all
               ? std::string("fault-all")
               : "on demand with " + std::to_string(options.fault_around_bytes / 1024) +
                     " KiB fault-around") +
          "; at most " + std::to_string(options.max_pending_handshakes) +
          " connections waiting for their handshake (" +
          std::to_string(options.handshake_timeout.count()) + " ms each) and " +
          std::to_string(options.max_active_vms) + " VMs served at once" + AccessNote(options));
  return std::unique_ptr<HandlerServer>(new HandlerServer(std::move(impl)));
}

HandlerServer::HandlerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HandlerServer::~HandlerServer() {
  impl_->engine.reset();  // closes whatever is still served; its callbacks use impl_
  // With VMs left to the keeper, the socket stays: the keeper holds it for the next daemon.
  if (impl_->left_to_keeper == 0) unlink(impl_->options.socket_path.c_str());
}

void HandlerServer::Stop() { Signal(impl_->stop_fd.get()); }

Status HandlerServer::Impl::Watch(int fd, uint64_t token, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = token;
  if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return PosixError(errno, "serve: epoll_ctl ADD fd " + std::to_string(fd));
  }
  return OkStatus();
}

std::optional<Clock::time_point> HandlerServer::Impl::NextWake() const {
  std::optional<Clock::time_point> wake;
  auto consider = [&](Clock::time_point t) { wake = wake ? std::min(*wake, t) : t; };
  if (!deadlines.empty()) consider(deadlines.begin()->first);
  if (!listener_watched) consider(listener_resumes);
  // Folded lines are reported once their window has passed, even when nothing else happens.
  if (accept_log.has_pending() || refused_log.has_pending() || denied_log.has_pending()) {
    consider(Clock::now() + kLogFoldWindow);
  }
  return wake;
}

Status HandlerServer::Run() {
  Impl& s = *impl_;
  epoll_event events[kEventsPerTurn];
  bool stopping = false;
  while (!stopping) {
    if (s.options.max_vms > 0 && s.finished_vms >= s.options.max_vms) break;
    const int n =
        epoll_wait(s.epoll.get(), events, kEventsPerTurn, TimeoutMs(Clock::now(), s.NextWake()));
    if (n < 0 && errno != EINTR) return PosixError(errno, "serve: epoll_wait");
    const Clock::time_point now = Clock::now();
    for (int i = 0; i < std::max(n, 0); ++i) {
      const uint64_t token = events[i].data.u64;
      // A failure while serving one connection (an allocation that failed, most likely) ends
      // that connection only.
      try {
        if (token == kStopToken) {
          stopping = true;
        } else if (token == kNoticeToken) {
          Drain(s.notice_fd.get());
        } else if (token == kListenerToken) {
          s.AcceptReady(now);
        } else {
          s.ConnectionReady(token, events[i].events);
        }
      } catch (const std::exception& e) {
        if (token < kListenerToken) {
          s.Drop(token, e.what());
        } else {
          Log(LogLevel::kError, std::string("serve: ") + e.what() + " while handling an event");
        }
      }
    }
    try {
      s.HandleNotices();
      s.ExpireHandshakes(now);
      s.ResumeListenerIfDue(now);
      s.accept_log.Flush();
      s.refused_log.Flush();
      s.denied_log.Flush();
    } catch (const std::exception& e) {
      Log(LogLevel::kError, std::string("serve: ") + e.what() + " in the server loop");
    }
  }
  if (stopping) {
    Log(LogLevel::kInfo,
        "shutting down: " + std::to_string(s.active_vms) + " VM(s) still connected");
  }
  // Graceful: every VM still here is detached and freed, with its statistics logged; with a
  // keeper, each stays kept for the next daemon.
  s.HandleNotices();
  s.handing_over = s.keeper != nullptr;
  std::vector<uint64_t> left;
  for (const auto& [vm, c] : s.connections) left.push_back(vm);
  std::sort(left.begin(), left.end());
  for (uint64_t vm : left) {
    Impl::Connection& c = s.connections.at(vm);
    if (c.phase == Impl::Phase::kServing) {
      s.Hangup(c, "detached at shutdown");
    } else if (c.phase == Impl::Phase::kHandshake) {
      s.Erase(vm);
    }
  }
  // Spaces that ended by themselves meanwhile have posted their notices (a space's notice is
  // posted before RemoveSpace can tell it is gone, bar the instant in between).
  s.HandleNotices();
  while (!s.connections.empty()) {
    Impl::Connection& c = s.connections.begin()->second;
    s.Finish(c, LogLevel::kInfo, c.name + " disconnected; its statistics were not in by shutdown",
             FaultStats{});
  }
  s.accept_log.Flush(/*force=*/true);
  s.refused_log.Flush(/*force=*/true);
  s.denied_log.Flush(/*force=*/true);
  if (s.keeper != nullptr) {
    if (s.left_to_keeper > 0) {
      Log(LogLevel::kInfo, "left " + std::to_string(s.left_to_keeper) + " VM(s) to the keeper at " +
                               s.keeper->path() + " for the next gmem serve on " +
                               s.options.socket_path);
    } else if (Status released = s.keeper->Release(); !released) {
      Log(LogLevel::kWarning,
          "the keeper did not take its release: " + released.error().ToString());
    }
  }
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Taking over from a predecessor

Status HandlerServer::Impl::TakeOverFromKeeper() {
  for (KeptVm& kept : inherited.vms) next_vm = std::max(next_vm, kept.id + 1);
  for (KeptVm& kept : inherited.vms) {
    if (Status resumed = Resume(kept); !resumed) {
      // Without its descriptors nobody can serve it: its threads stay blocked, as they were.
      Log(LogLevel::kError,
          "vm " + std::to_string(kept.id) +
              " left by the previous daemon cannot be taken over: " + resumed.error().ToString());
      (void)keeper->Forget(kept.id);
    }
  }
  inherited.vms.clear();
  return OkStatus();
}

Status HandlerServer::Impl::Resume(KeptVm& kept) {
  const nlohmann::json d = nlohmann::json::parse(kept.description, nullptr, false);
  if (!d.is_object() || !d.contains("regions") || !d.contains("snapshot") ||
      !d["snapshot"].is_string() || !d.contains("tracker_pages") ||
      !d["tracker_pages"].is_number_unsigned()) {
    return Error(ErrorCode::kProtocolError, "its description is not one this daemon writes");
  }
  const bool minor_trap = d.value("minor_trap", false);
  if (kept.fds.size() != (minor_trap ? 4u : 3u)) {
    return Error(ErrorCode::kProtocolError,
                 "kept with " + std::to_string(kept.fds.size()) + " descriptors");
  }
  VmSpec spec;
  spec.name = d.value("name", "vm " + std::to_string(kept.id)) + " [taken over]";
  GM_ASSIGN_OR_RETURN(spec.regions, ParseHandshake(d["regions"].dump()));
  const std::string snapshot_path = d["snapshot"].get<std::string>();
  if (snapshot_path == options.mem_file_path) {
    GM_ASSIGN_OR_RETURN(spec.snapshot, CurrentSource());
  } else {
    GM_ASSIGN_OR_RETURN(spec.snapshot, OpenSnapshot(snapshot_path));
  }
  GM_RETURN_IF_ERROR(ValidateHandshake(spec.regions, spec.snapshot->size()));
  spec.fault_all = d.value("fault_all", false);
  spec.fault_around_bytes = d.value("fault_around_bytes", kDefaultFaultAroundBytes);
  spec.uffd = std::move(kept.fds[0]);
  GM_ASSIGN_OR_RETURN(spec.tracker, PageTracker::AttachShared(std::move(kept.fds[2]),
                                                              d["tracker_pages"].get<uint64_t>()));
  if (minor_trap) spec.memory_file = std::move(kept.fds[3]);
  spec.resume = true;
  Connection c;
  c.vm = kept.id;
  c.name = spec.name;
  c.accepted = Clock::now();
  c.socket = std::move(kept.fds[1]);
  GM_RETURN_IF_ERROR(Watch(c.socket.get(), c.vm, EPOLLIN | EPOLLRDHUP));
  c.phase = Phase::kServing;
  const std::string name = c.name;
  auto [it, inserted] = connections.emplace(c.vm, std::move(c));
  ++active_vms;
  auto space = StartSpace(kept.id, std::move(spec), nullptr);
  if (!space) {
    epoll_ctl(epoll.get(), EPOLL_CTL_DEL, it->second.socket.get(), nullptr);
    connections.erase(it);
    --active_vms;
    return std::move(space).error();
  }
  it->second.space = *space;
  Log(LogLevel::kInfo,
      name + ": taken over from the previous daemon; serving as space " + std::to_string(*space));
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Accepting

void HandlerServer::Impl::PauseListener(Clock::time_point now) {
  listener_resumes = now + kAcceptBackoff;
  if (!listener_watched) return;
  epoll_event ev{};
  ev.data.u64 = kListenerToken;  // no events: not polled until resumed
  if (epoll_ctl(epoll.get(), EPOLL_CTL_MOD, listener.get(), &ev) == 0) listener_watched = false;
}

void HandlerServer::Impl::ResumeListenerIfDue(Clock::time_point now) {
  if (listener_watched || now < listener_resumes) return;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenerToken;
  if (epoll_ctl(epoll.get(), EPOLL_CTL_MOD, listener.get(), &ev) == 0) listener_watched = true;
}

void HandlerServer::Impl::AcceptReady(Clock::time_point now) {
  for (int i = 0; i < kAcceptsPerTurn; ++i) {
    const int fd = accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      AddConnection(UniqueFd(fd), now);
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return;
    if (err == EINTR || err == ECONNABORTED) continue;
    if (err == EMFILE || err == ENFILE) {
      ShedOnePendingConnection(err);
    } else {
      accept_log.Log(LogLevel::kError, "accept: " + PosixError(err, "").ToString() +
                                           "; not accepting for " +
                                           std::to_string(kAcceptBackoff.count()) + " ms");
    }
    // Out of descriptors or memory: the connection stays queued and the listener readable, so
    // accepting again at once would spin. Rest the listener instead.
    PauseListener(now);
    return;
  }
}

void HandlerServer::Impl::ShedOnePendingConnection(int err) {
  std::string line = "accept: out of descriptors (" + PosixError(err, "").ToString() + "); ";
  if (reserve) {
    // The reserve descriptor makes room to take the connection that waits and close it, so that
    // its client learns at once instead of hanging in the backlog.
    reserve.reset();
    UniqueFd shed(accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    line += shed ? "closed a waiting connection; " : "";
    shed.reset();
    reserve.reset(open("/dev/null", O_RDONLY | O_CLOEXEC));
  }
  if (!reserve) line += "no reserve descriptor; ";
  line += "not accepting for " + std::to_string(kAcceptBackoff.count()) + " ms";
  accept_log.Log(LogLevel::kWarning, line);
}

bool HandlerServer::Impl::Allowed(const std::optional<PeerCredentials>& peer) const {
  if (options.allow_uids.empty() && options.allow_gids.empty()) return true;
  if (!peer) return false;
  auto listed = [](const auto& list, auto id) {
    return std::find(list.begin(), list.end(), id) != list.end();
  };
  if (listed(options.allow_uids, peer->uid) || listed(options.allow_gids, peer->gid)) return true;
  return std::any_of(peer->groups.begin(), peer->groups.end(),
                     [&](gid_t g) { return listed(options.allow_gids, g); });
}

void HandlerServer::Impl::AddConnection(UniqueFd socket, Clock::time_point now) {
  std::optional<PeerCredentials> peer;
  if (auto creds = GetPeerCredentials(socket.get())) peer = std::move(*creds);
  if (!Allowed(peer)) {
    denied_log.Log(
        LogLevel::kWarning,
        "refused a connection from " +
            (peer ? "pid " + std::to_string(peer->pid) + " (uid " + std::to_string(peer->uid) +
                        ", gid " + std::to_string(peer->gid) + ")"
                  : std::string("a peer whose credentials are unknown")) +
            ": not allowed by --allow-uid/--allow-gid");
    return;  // closes it
  }
  if (pending_handshakes >= options.max_pending_handshakes) {
    refused_log.Log(LogLevel::kWarning,
                    "refused a connection: " + std::to_string(pending_handshakes) +
                        " connections are waiting for their handshake, the most allowed "
                        "(--max-pending-handshakes)");
    return;  // closes it
  }
  const uint64_t vm = next_vm++;
  Connection c;
  c.vm = vm;
  c.name = PeerName(vm, peer);
  c.accepted = now;
  c.deadline = now + options.handshake_timeout;
  c.reader.emplace();
  if (Status watched = Watch(socket.get(), vm, EPOLLIN | EPOLLRDHUP); !watched) {
    Log(LogLevel::kError, c.name + " rejected: " + watched.error().ToString());
    return;
  }
  c.socket = std::move(socket);
  deadlines.emplace(c.deadline, vm);
  ++pending_handshakes;
  connections.emplace(vm, std::move(c));
}

// ---------------------------------------------------------------------------------------------
// Connections

void HandlerServer::Impl::ConnectionReady(uint64_t vm, uint32_t events) {
  auto it = connections.find(vm);
  if (it == connections.end()) return;
  Connection& c = it->second;
  switch (c.phase) {
    case Phase::kHandshake:
      HandshakeReady(c);
      return;
    case Phase::kServing:
      ServingReady(c, events);
      return;
    case Phase::kClosing:
      return;  // its socket is closed already
  }
}

void HandlerServer::Impl::HandshakeReady(Connection& c) {
  auto progress = c.reader->ReadFrom(c.socket.get());
  if (progress && *progress == HandshakeReader::Progress::kNeedMore) return;
  if (!progress) {
    if (progress.error().code() == ErrorCode::kPeerGone) {
      Log(LogLevel::kInfo, c.name + " closed before its handshake");
    } else {
      Log(LogLevel::kError, c.name + " rejected: " + progress.error().ToString());
    }
    Erase(c.vm);
    return;
  }
  ReceivedHandshake handshake = c.reader->Take();
  Result<SpaceId> space = Admit(c, handshake);
  if (!space) {
    Log(LogLevel::kError, c.name + " rejected: " + space.error().ToString());
    Erase(c.vm);
    return;
  }
  c.space = *space;
  SetPhase(c, Phase::kServing);
  Log(LogLevel::kInfo, c.name + " connected: " + std::to_string(handshake.regions.size()) +
                           " region(s), " + std::to_string(handshake.fds.size()) +
                           " descriptor(s); serving as space " + std::to_string(c.space));
}

Result<SpaceId> HandlerServer::Impl::Admit(Connection& c, ReceivedHandshake& handshake) {
  if (active_vms >= options.max_active_vms) {
    return Error(ErrorCode::kResourceExhausted, "already serving " + std::to_string(active_vms) +
                                                    " VMs, the most allowed (--max-active-vms)");
  }
  GM_ASSIGN_OR_RETURN(const std::shared_ptr<const RawFileSource> snapshot, CurrentSource());
  GM_RETURN_IF_ERROR(ValidateHandshake(handshake.regions, snapshot->size()));
  if (handshake.fds.empty()) {
    return Error(ErrorCode::kProtocolError, "no userfaultfd attached to the handshake");
  }
  VmSpec spec;
  spec.name = c.name;
  spec.regions = handshake.regions;
  spec.snapshot = snapshot;
  spec.fault_all = options.fault_all;
  spec.fault_around_bytes = options.fault_around_bytes;
  spec.uffd = std::move(handshake.fds[0]);
  const bool guest_memfd =
      std::any_of(handshake.regions.begin(), handshake.regions.end(),
                  [](const auto& r) { return r.is_guest_memfd.value_or(false); });
  if (guest_memfd) {
    if (handshake.fds.size() < 2) {
      return Error(ErrorCode::kProtocolError,
                   "is_guest_memfd is set but no guest memory file descriptor was attached");
    }
    spec.memory_file = std::move(handshake.fds[1]);
  }
  KeptVm kept;
  GM_ASSIGN_OR_RETURN(SpaceId space, StartSpace(c.vm, std::move(spec), &kept));
  if (keeper != nullptr) {
    std::vector<int> fds{kept.fds[0].get(), c.socket.get()};
    for (size_t i = 1; i < kept.fds.size(); ++i) fds.push_back(kept.fds[i].get());
    if (Status kept_ok = keeper->Keep(c.vm, kept.description, fds, /*watch=*/1); !kept_ok) {
      Log(LogLevel::kWarning, c.name + " is served but not kept (a restart would lose it): " +
                                  kept_ok.error().ToString());
    }
  }
  return space;
}

Result<SpaceId> HandlerServer::Impl::StartSpace(uint64_t vm, VmSpec spec, KeptVm* kept) {
  std::vector<GuestRegion> regions;
  uint64_t regions_end = 0;
  for (const HandshakeRegion& r : spec.regions) {
    regions_end = std::max(regions_end, r.offset + r.size);  // validated: no overflow
    regions.push_back(GuestRegion{GuestPhysAddr(r.gpa_start.value_or(r.offset)), r.size,
                                  FileOffset(r.offset), HostVirtAddr(r.base_host_virt_addr),
                                  r.page_size});
  }
  GM_ASSIGN_OR_RETURN(GuestLayout layout, GuestLayout::Create(std::move(regions)));
  // Copies for the keeper, taken before the library adopts the descriptors.
  UniqueFd uffd_copy(fcntl(spec.uffd.get(), F_DUPFD_CLOEXEC, 0));
  if (!uffd_copy) return PosixError(errno, "duplicating the uffd for the keeper");
  GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Adopt(std::move(spec.uffd)));

  FaultHandlerOptions handler_options;
  handler_options.name = spec.name;
  handler_options.fault_all = spec.fault_all;
  handler_options.fault_around_bytes = spec.fault_around_bytes;
  handler_options.resume = spec.resume;
  const uint64_t tracker_pages = layout.file_end() / kPageSize4K;
  if (spec.tracker == nullptr) {
    GM_ASSIGN_OR_RETURN(spec.tracker, PageTracker::CreateShared(tracker_pages));
  }
  UniqueFd tracker_copy(fcntl(spec.tracker->shared_fd(), F_DUPFD_CLOEXEC, 0));
  if (!tracker_copy) return PosixError(errno, "duplicating the page tracker for the keeper");
  handler_options.tracker = spec.tracker;
  std::shared_ptr<WorkingSetRecorder> recorder;
  if (learner && !spec.resume) {
    // A VM taken over is not learned from: what it needed before the takeover is not known.
    handler_options.prefetch = learner->LearnedFor(*spec.snapshot);
    recorder = std::make_shared<WorkingSetRecorder>();
    handler_options.recorder = recorder;
  }
  UniqueFd memory_file_copy;
  if (spec.memory_file) {
    // The secret-hiding variant: uffd, guest memory file, bitmap. Content goes into the file,
    // then UFFDIO_CONTINUE maps it (the full minor trap).
    const int guest_memfd_fd = spec.memory_file.get();
    struct stat st {};
    if (fstat(guest_memfd_fd, &st) != 0) return PosixError(errno, "fstat of the guest memory file");
    // Firecracker's guest_memfd is exactly the regions back to back: it covers every region and
    // is no larger than the snapshot. Checked before anything is sized from it.
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < regions_end) {
      return Error(ErrorCode::kInvalidArgument,
                   "the guest memory file (" + std::to_string(file_size) +
                       " bytes) does not cover the regions, which end at byte " +
                       std::to_string(regions_end));
    }
    if (file_size > spec.snapshot->size()) {
      return Error(ErrorCode::kInvalidArgument, "the guest memory file (" +
                                                    std::to_string(file_size) +
                                                    " bytes) is larger than the snapshot (" +
                                                    std::to_string(spec.snapshot->size()) +
                                                    " bytes); it must be the regions back to back");
    }
    memory_file_copy.reset(fcntl(guest_memfd_fd, F_DUPFD_CLOEXEC, 0));
    if (!memory_file_copy) return PosixError(errno, "duplicating the guest memory file");
    MemoryFileOptions file_options;
    file_options.name = spec.name;
    file_options.size_bytes = file_size;
    file_options.max_size_bytes = spec.snapshot->size();
    GM_ASSIGN_OR_RETURN(file_options.backend, IdentifyBackend(guest_memfd_fd));
    GM_ASSIGN_OR_RETURN(auto memory_file,
                        MemoryFile::Adopt(std::move(spec.memory_file), file_options));
    if (spec.resume) {
      // What the file holds was put there by the previous daemon (the snapshot's content) or
      // written by the guest since: it is only ever mapped again, never written over.
      const PageStateMap& pages = memory_file->pages();
      for (uint64_t p = 0; p < pages.page_count();) {
        if (pages.Get(p) != PageState::kAllocated) {
          ++p;
          continue;
        }
        uint64_t end = p + 1;
        while (end < pages.page_count() && pages.Get(end) == PageState::kAllocated) ++end;
        GM_RETURN_IF_ERROR(memory_file->MarkPrepared(FileOffset(p * memory_file->page_size()),
                                                     (end - p) * memory_file->page_size()));
        p = end;
      }
    }
    handler_options.mode = InstallMode::kMinorTrap;
    handler_options.memory_file = std::move(memory_file);
  }
  const bool minor_trap = handler_options.mode == InstallMode::kMinorTrap;
  GM_ASSIGN_OR_RETURN(auto handler,
                      FaultHandler::Create(std::move(uffd), std::move(layout), spec.snapshot,
                                           std::move(handler_options)));
  // The connection's record exists before the space does: whenever the space ends, its notice
  // finds the record.
  GM_ASSIGN_OR_RETURN(SpaceId space,
                      engine->AddSpace(std::move(handler), [this, vm](SpaceId id, const Status& why,
                                                                      const FaultStats& stats) {
                        OnSpaceClosed(vm, id, why, stats);
                      }));
  Connection& c = connections.at(vm);
  c.recorder = std::move(recorder);
  c.snapshot = spec.snapshot;
  if (kept != nullptr) {
    nlohmann::json description = {{"name", spec.name},
                                  {"snapshot", spec.snapshot->path()},
                                  {"regions", nlohmann::json::parse(EncodeHandshake(spec.regions))},
                                  {"fault_all", spec.fault_all},
                                  {"fault_around_bytes", spec.fault_around_bytes},
                                  {"tracker_pages", tracker_pages},
                                  {"minor_trap", minor_trap}};
    kept->id = vm;
    kept->description = description.dump();
    kept->fds.clear();
    kept->fds.push_back(std::move(uffd_copy));
    kept->fds.push_back(std::move(tracker_copy));
    if (memory_file_copy) kept->fds.push_back(std::move(memory_file_copy));
  }
  return space;
}

Result<std::unique_ptr<RawFileSource>> HandlerServer::Impl::OpenSnapshot(const std::string& path) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> snapshot, RawFileSource::Open(path));
  auto zero_map = cache ? cache->ZeroMapFor(*snapshot) : ZeroMap::Scan(*snapshot);
  if (zero_map) {
    snapshot->SetZeroMap(std::move(*zero_map));
  } else {
    // Still correct: zero pages that are not holes are copied as data.
    Log(LogLevel::kWarning, "zero pages of " + path + " not found (" + zero_map.error().ToString() +
                                "): only its holes are known zero");
  }
  return snapshot;
}

Result<std::shared_ptr<const RawFileSource>> HandlerServer::Impl::CurrentSource() {
  auto changed = source->WhatChanged();
  if (!changed) {
    return std::move(changed).error().WithContext("the memory file " + options.mem_file_path +
                                                  " cannot be checked");
  }
  if (changed->empty()) return source;
  auto reopened = OpenSnapshot(options.mem_file_path);
  if (!reopened) {
    return std::move(reopened).error().WithContext("the memory file changed (" + *changed +
                                                   ") and cannot be opened again");
  }
  const bool identity_changed = (*reopened)->identity() != source->identity();
  source = std::move(*reopened);
  // A file only written shortly before it was opened is opened again for each new VM until its
  // last write is old enough: logged only when it did change.
  Log(identity_changed ? LogLevel::kInfo : LogLevel::kDebug,
      "memory file " + options.mem_file_path + " changed (" + *changed +
          "): opened again for new VMs, " + source->Describe());
  return source;
}

void HandlerServer::Impl::ServingReady(Connection& c, uint32_t events) {
  // Firecracker never closes while it lives, and nothing it sends after the handshake is read
  // by this server yet: the hang-up is what matters; other bytes are dropped, a few per turn.
  char discard[kDiscardBytesPerTurn];
  const ssize_t n = recv(c.socket.get(), discard, sizeof(discard), MSG_DONTWAIT);
  const bool hung_up = (events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)) != 0 || n == 0 ||
                       (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  if (hung_up) Hangup(c, "disconnected");
}

void HandlerServer::Impl::ExpireHandshakes(Clock::time_point now) {
  while (!deadlines.empty() && deadlines.begin()->first <= now) {
    const uint64_t vm = deadlines.begin()->second;
    Connection& c = connections.at(vm);  // a deadline is erased with its connection's phase
    Log(LogLevel::kError, c.name + " rejected: no complete handshake within " +
                              std::to_string(options.handshake_timeout.count()) + " ms (" +
                              std::to_string(c.reader->bytes_received()) + " bytes received)");
    Erase(vm);
  }
}

// ---------------------------------------------------------------------------------------------
// The end of a VM

void HandlerServer::Impl::OnSpaceClosed(uint64_t vm, SpaceId space, const Status& why,
                                        const FaultStats& stats) {
  // A worker thread: only post, never touch the loop's state. Removed by Hangup (an OK status):
  // the loop knows already.
  if (why) return;
  try {
    std::lock_guard lock(mu);
    ended.push_back(SpaceEnded{vm, space, why, stats});
  } catch (...) {
    notice_lost.store(true);  // the loop finds out which space is gone by asking the engine
  }
  Signal(notice_fd.get());
}

void HandlerServer::Impl::HandleNotices() {
  std::vector<SpaceEnded> notices;
  {
    std::lock_guard lock(mu);
    notices.swap(ended);
  }
  for (const SpaceEnded& notice : notices) {
    auto it = connections.find(notice.vm);
    if (it == connections.end()) continue;
    Connection& c = it->second;
    if (notice.space != c.space) {
      // A space the engine made for a child the VM forked: the VM itself goes on.
      Log(LogLevel::kInfo,
          c.name + ": the space of a forked child (" + std::to_string(notice.space) +
              ") ended: " + notice.why.error().ToString() + "; " + notice.stats.ToString());
      continue;
    }
    SpaceEndedByItself(c, notice);
  }
  if (notice_lost.exchange(false)) Reconcile();
}

void HandlerServer::Impl::Reconcile() {
  std::vector<uint64_t> gone;
  for (const auto& [vm, c] : connections) {
    if ((c.phase == Phase::kServing || c.phase == Phase::kClosing) && !engine->Stats(c.space)) {
      gone.push_back(vm);
    }
  }
  for (uint64_t vm : gone) {
    Connection& c = connections.at(vm);
    Finish(c, LogLevel::kWarning,
           c.name + " ended after " + Seconds(Clock::now() - c.accepted) +
               ": its space is gone (its reason and statistics were lost for want of memory)",
           FaultStats{});
  }
}

void HandlerServer::Impl::SpaceEndedByItself(Connection& c, const SpaceEnded& notice) {
  const Error& why = notice.why.error();
  const bool exited = why.code() == ErrorCode::kPeerGone;
  Finish(c, exited ? LogLevel::kInfo : LogLevel::kError,
         c.name + (c.phase == Phase::kClosing ? " disconnected after " : " ended after ") +
             Seconds(Clock::now() - c.accepted) + (exited ? ": " : ": failed: ") + why.ToString() +
             "; " + notice.stats.ToString(),
         notice.stats);
}

void HandlerServer::Impl::Hangup(Connection& c, const char* why) {
  auto stats = engine->RemoveSpace(c.space);
  if (!stats) {
    // The space ended by itself a moment ago; its notice (with the reason and statistics) is
    // posted or about to be. Close the socket now and finish when it arrives.
    epoll_ctl(epoll.get(), EPOLL_CTL_DEL, c.socket.get(), nullptr);
    c.socket.reset();
    SetPhase(c, Phase::kClosing);
    return;
  }
  Finish(c, LogLevel::kInfo,
         c.name + " " + why + " after " + Seconds(Clock::now() - c.accepted) + ": " +
             stats->ToString(),
         *stats);
}

void HandlerServer::Impl::Drop(uint64_t vm, const std::string& why) {
  auto it = connections.find(vm);
  if (it == connections.end()) return;
  Connection& c = it->second;
  const std::string line = c.name + " dropped: " + why;
  if (c.phase == Phase::kHandshake) {
    Log(LogLevel::kError, line);
    Erase(vm);
    return;
  }
  // A notice the space may still post finds no record and is ignored.
  if (c.phase == Phase::kServing) (void)engine->RemoveSpace(c.space);
  Finish(c, LogLevel::kError, line, FaultStats{});
}

void HandlerServer::Impl::Finish(Connection& c, LogLevel level, const std::string& line,
                                 const FaultStats& stats) {
  Log(level, line);
  if (c.recorder != nullptr && level == LogLevel::kInfo) {
    // A VM that ended well (not dropped, not failed) is what the next restores will look like.
    const std::vector<uint64_t> needed = c.recorder->Take();
    if (auto learned = learner->Learn(*c.snapshot, needed, c.recorder->prefetched())) {
      Log(LogLevel::kDebug, c.name + ": its faults needed " + std::to_string(needed.size()) +
                                " pages; the working set of " + c.snapshot->path() + " is " +
                                std::to_string(learned->size()) + " pages after " +
                                std::to_string(learned->restores()) + " restores");
    }
  }
  const std::string name = c.name;
  Erase(c.vm);  // c is gone from here on
  if (options.on_vm_finished) options.on_vm_finished(name, stats);
}

void HandlerServer::Impl::SetPhase(Connection& c, Phase phase) {
  if (c.phase == Phase::kHandshake) {
    --pending_handshakes;
    deadlines.erase({c.deadline, c.vm});
    c.reader.reset();
  }
  if (phase == Phase::kServing) ++active_vms;  // kServing -> kClosing: still one
  c.phase = phase;
}

void HandlerServer::Impl::Erase(uint64_t vm) {
  auto it = connections.find(vm);
  if (it == connections.end()) return;
  Connection& c = it->second;
  if (c.phase == Phase::kHandshake) {
    --pending_handshakes;
    deadlines.erase({c.deadline, vm});
  } else {
    --active_vms;
    ++finished_vms;
    if (keeper != nullptr) {
      if (handing_over && c.phase == Phase::kServing) {
        ++left_to_keeper;  // its VM goes on: the next daemon serves it
      } else if (Status forgotten = keeper->Forget(vm); !forgotten) {
        Log(LogLevel::kWarning,
            c.name + ": the keeper did not forget it: " + forgotten.error().ToString());
      }
    }
  }
  if (c.socket) epoll_ctl(epoll.get(), EPOLL_CTL_DEL, c.socket.get(), nullptr);
  connections.erase(it);  // closes the socket
}

}  // namespace guestmem::cli
