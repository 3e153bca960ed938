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

#include "guestmem/apf_control.h"
#include "guestmem/fault_engine.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/log.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/snapshot.h"
#include "guestmem/page_tracker.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfault_bitmap.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/working_set_learner.h"
#include "guestmem/zero_map.h"
#include "serve/handler_server_impl.h"
#include "serve/keeper.h"
#include "serve/vcpu_faults.h"
#include "serve/vcpu_requests.h"

namespace guestmem::cli {
namespace {

constexpr int kEventsPerTurn = 64;
// How long completions that found an exitless complete ring full wait before they are tried again.
constexpr std::chrono::milliseconds kCompletionRetry{1};
// Bytes read (and dropped) per turn from a VM's socket after its handshake.
constexpr size_t kDiscardBytesPerTurn = 4096;
// How long the listener rests when accept fails for want of descriptors or memory.
constexpr std::chrono::milliseconds kAcceptBackoff{100};

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

// A VM's fill as its description for the keeper names it, and back (unknown: none).
const char* FillName(FillMode fill) {
  switch (fill) {
    case FillMode::kNone:
      break;
    case FillMode::kAtFirstFault:
      return "fault-all";
    case FillMode::kBackground:
      return "background";
  }
  return "none";
}

FillMode FillFromName(const std::string& name) {
  for (FillMode fill : {FillMode::kAtFirstFault, FillMode::kBackground}) {
    if (name == FillName(fill)) return fill;
  }
  return FillMode::kNone;
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

// The Uffd socket and the APF socket: both with the socket's mode, owner and group.
UnixListenOptions ListenOptionsOf(const ServeOptions& options) {
  UnixListenOptions listen;
  listen.mode = options.socket_mode;
  listen.owner = options.socket_owner;
  listen.group = options.socket_group;
  listen.backlog = 256;
  return listen;
}

int TimeoutMs(Clock::time_point now, std::optional<Clock::time_point> wake) {
  if (!wake) return -1;
  if (*wake <= now) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(*wake - now).count();
  return static_cast<int>(std::min<int64_t>(ms, 60'000));
}

}  // namespace

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
  if (options.fill_bytes_per_second < kMinFillBytesPerSecond ||
      options.fill_bytes_per_second > kMaxFillBytesPerSecond) {
    return invalid("--fill-rate-mib " + std::to_string(options.fill_bytes_per_second >> 20) +
                   (options.fill_bytes_per_second % (1 << 20) != 0
                        ? " (" + std::to_string(options.fill_bytes_per_second) + " bytes a second)"
                        : "") +
                   ": must be from " + std::to_string(kMinFillBytesPerSecond >> 20) + " to " +
                   std::to_string(kMaxFillBytesPerSecond >> 20) + " MiB/s");
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
  GM_ASSIGN_OR_RETURN(impl->source, impl->OpenSnapshot(options.mem_file_path));
  GM_ASSIGN_OR_RETURN(impl->engine, FaultEngine::Start({.workers = options.workers}));
  ServeMetrics::StoreFn store_of;
  if (impl->remote) {
    store_of = [store = impl->remote->store, disk = impl->remote->disk_cache] {
      StoreView view{.requests = store->counters()};
      if (disk) view.disk_cache = disk->counters();
      return std::optional<StoreView>(view);
    };
  }
  impl->metrics = std::make_unique<ServeMetrics>(
      [engine = impl->engine.get()](SpaceId space) { return engine->Stats(space); },
      std::move(store_of));
  if (options.metrics_address) {
    // Bound before anything is taken over: a port in use stops the daemon having touched nothing.
    GM_ASSIGN_OR_RETURN(impl->metrics_http,
                        MetricsHttpServer::Start(*options.metrics_address, impl->metrics.get()));
    Log(LogLevel::kInfo,
        "metrics at http://" + impl->metrics_http->address().ToString() + "/metrics");
  }
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
  if (options.listen_fd >= 0) {
    // systemd's socket: it made the file and keeps it; a restart is given the same socket.
    impl->listener.reset(options.listen_fd);
    impl->socket_activated = true;
    const int flags = fcntl(options.listen_fd, F_GETFL);
    if (flags < 0 || fcntl(options.listen_fd, F_SETFL, flags | O_NONBLOCK) != 0 ||
        fcntl(options.listen_fd, F_SETFD, FD_CLOEXEC) != 0) {
      return PosixError(errno, "serve: the socket from systemd (LISTEN_FDS)");
    }
    if (impl->keeper != nullptr)
      GM_RETURN_IF_ERROR(impl->keeper->KeepListener(impl->listener.get()));
  } else if (impl->inherited.listener && stat(options.socket_path.c_str(), &socket_file) == 0 &&
             S_ISSOCK(socket_file.st_mode)) {
    // The socket a predecessor listened on, kept: VMs that connected meanwhile are in its backlog.
    impl->listener = std::move(impl->inherited.listener);
  } else {
    GM_ASSIGN_OR_RETURN(impl->listener, ListenUnix(options.socket_path, ListenOptionsOf(options)));
    if (impl->keeper != nullptr)
      GM_RETURN_IF_ERROR(impl->keeper->KeepListener(impl->listener.get()));
  }
  if (options.apf) {
    // Firecracker connects to it first, at the very start of a snapshot load: it listens before
    // any VM could come.
    impl->apf_path = ApfSocketPath(options.socket_path);
    struct stat apf_file {};
    if (impl->inherited.apf_listener && stat(impl->apf_path.c_str(), &apf_file) == 0 &&
        S_ISSOCK(apf_file.st_mode)) {
      impl->apf_listener = std::move(impl->inherited.apf_listener);
    } else {
      auto apf = ListenUnix(impl->apf_path, ListenOptionsOf(options));
      if (!apf) return std::move(apf).error().WithContext("--apf: the APF socket");
      impl->apf_listener = std::move(*apf);
      if (impl->keeper != nullptr) {
        GM_RETURN_IF_ERROR(
            impl->keeper->KeepListener(impl->apf_listener.get(), ListenerRole::kApf));
      }
    }
  }
  GM_RETURN_IF_ERROR(impl->Watch(impl->stop_fd.get(), kStopToken, EPOLLIN));
  GM_RETURN_IF_ERROR(impl->Watch(impl->notice_fd.get(), kNoticeToken, EPOLLIN));
  GM_RETURN_IF_ERROR(impl->Watch(impl->listener.get(), kListenerToken, EPOLLIN));
  if (impl->apf_listener) {
    GM_RETURN_IF_ERROR(impl->Watch(impl->apf_listener.get(), kApfListenerToken, EPOLLIN));
  }
  GM_RETURN_IF_ERROR(impl->TakeOverFromKeeper());
  if (!options.control_path.empty()) {
    auto control = ControlServer::Start(options.control_path, impl->metrics.get());
    if (!control) return std::move(control).error().WithContext("the control socket");
    impl->control_server = std::move(*control);
  }

  char mode[8];
  (void)std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(options.socket_mode));
  Log(LogLevel::kInfo,
      "serving " + impl->source->Describe() + " on " + options.socket_path + " (mode " + mode +
          ") with " + std::to_string(impl->engine->worker_count()) + " workers, " +
          (options.fill == FillMode::kAtFirstFault
               ? std::string("fault-all")
               : "on demand with " + std::to_string(options.fault_around_bytes / 1024) +
                     " KiB fault-around" +
                     (options.fill == FillMode::kBackground
                          ? " and a background fill at " +
                                std::to_string(options.fill_bytes_per_second >> 20) + " MiB/s"
                          : std::string())) +
          "; at most " + std::to_string(options.max_pending_handshakes) +
          " connections waiting for their handshake (" +
          std::to_string(options.handshake_timeout.count()) + " ms each) and " +
          std::to_string(options.max_active_vms) + " VMs served at once" + AccessNote(options) +
          (impl->apf_listener ? "; APF socket " + impl->apf_path : std::string()) +
          (impl->socket_activated ? "; socket from systemd" : std::string()) +
          (impl->control_server ? "; control socket " + impl->control_server->path()
                                : std::string()));
  return std::unique_ptr<HandlerServer>(new HandlerServer(std::move(impl)));
}

HandlerServer::HandlerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HandlerServer::~HandlerServer() {
  // The endpoints read the engine from their threads: they stop first.
  impl_->control_server.reset();
  impl_->metrics_http.reset();
  impl_->engine.reset();  // closes whatever is still served; its callbacks use impl_
  // With VMs left to the keeper, the sockets stay: the keeper holds them for the next daemon.
  // systemd's socket file is systemd's.
  if (impl_->left_to_keeper == 0) {
    if (!impl_->socket_activated) unlink(impl_->options.socket_path.c_str());
    if (!impl_->apf_path.empty()) unlink(impl_->apf_path.c_str());
  }
}

void HandlerServer::Stop() { SignalEventFd(impl_->stop_fd.get()); }

std::optional<MetricsAddress> HandlerServer::metrics_address() const {
  if (impl_->metrics_http == nullptr) return std::nullopt;
  return impl_->metrics_http->address();
}

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
  if (!apf_deadlines.empty()) consider(apf_deadlines.begin()->first);
  if (!listener_watched) consider(listener_resumes);
  if (!ready.empty()) consider(Clock::now());
  if (!completion_retry.empty()) consider(Clock::now() + kCompletionRetry);
  // Folded lines are reported once their window has passed, even when nothing else happens.
  if (accept_log.has_pending() || refused_log.has_pending() || denied_log.has_pending() ||
      apf_log.has_pending()) {
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
          DrainEventFd(s.notice_fd.get());
        } else if (token == kListenerToken) {
          s.AcceptReady(now);
        } else if (token == kApfListenerToken) {
          s.AcceptApfReady(now);
        } else {
          s.TokenReady(token, events[i].events, /*again=*/false);
        }
      } catch (const std::exception& e) {
        if (token < kApfListenerToken) {
          s.DropForToken(token, e.what());
        } else {
          Log(LogLevel::kError, std::string("serve: ") + e.what() + " while handling an event");
        }
      }
    }
    try {
      s.ProcessReady();
      s.HandleNotices();
      s.ExpireHandshakes(now);
      s.ResumeListenerIfDue(now);
      s.accept_log.Flush();
      s.refused_log.Flush();
      s.denied_log.Flush();
      s.apf_log.Flush();
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
  s.apf_log.Flush(/*force=*/true);
  while (!s.waiting_apf.empty()) s.EraseWaitingApf(s.waiting_apf.begin()->first);
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
  // Which descriptor is which: named in the description (older daemons: uffd, connection,
  // tracker and, in the minor trap, the guest memory file).
  std::vector<std::string> roles;
  if (auto listed = d.find("fds"); listed != d.end() && listed->is_array()) {
    for (const auto& role : *listed) {
      if (!role.is_string()) return Error(ErrorCode::kProtocolError, "a descriptor without a role");
      roles.push_back(role.get<std::string>());
    }
  } else {
    roles = {"uffd", "connection", "tracker"};
    if (minor_trap) roles.push_back("memory_file");
  }
  if (kept.fds.size() != roles.size()) {
    return Error(ErrorCode::kProtocolError, "kept with " + std::to_string(kept.fds.size()) +
                                                " descriptors; its description names " +
                                                std::to_string(roles.size()));
  }
  std::unordered_map<std::string, UniqueFd> named;
  std::vector<UniqueFd> ring_fds;
  for (size_t i = 0; i < roles.size(); ++i) {
    if (roles[i].rfind("ring_", 0) == 0) {
      ring_fds.push_back(std::move(kept.fds[i]));
    } else {
      named[roles[i]] = std::move(kept.fds[i]);
    }
  }
  for (const char* required : {"uffd", "connection", "tracker"}) {
    if (!named[required]) {
      return Error(ErrorCode::kProtocolError, std::string("kept without its ") + required);
    }
  }
  VmSpec spec;
  spec.kept_name = d.value("name", "vm " + std::to_string(kept.id));
  spec.name = spec.kept_name + " [taken over]";
  GM_ASSIGN_OR_RETURN(spec.regions, ParseHandshake(d["regions"].dump()));
  const std::string snapshot_path = d["snapshot"].get<std::string>();
  if (snapshot_path == options.mem_file_path) {
    GM_ASSIGN_OR_RETURN(spec.snapshot, CurrentSource());
  } else {
    GM_ASSIGN_OR_RETURN(spec.snapshot, OpenSnapshot(snapshot_path));
  }
  GM_RETURN_IF_ERROR(ValidateHandshake(spec.regions, spec.snapshot->size()));
  // "fill" from daemons that have it; "fault_all" from those before.
  const std::string fill = d.value(
      "fill", FillName(d.value("fault_all", false) ? FillMode::kAtFirstFault : FillMode::kNone));
  spec.fill = FillFromName(fill);
  // The rate is this daemon's, as for every VM it serves: a restart is how an operator changes it.
  spec.fill_bytes_per_second = options.fill_bytes_per_second;
  spec.fault_around_bytes = d.value("fault_around_bytes", kDefaultFaultAroundBytes);
  spec.uffd = std::move(named["uffd"]);
  GM_ASSIGN_OR_RETURN(spec.tracker, PageTracker::AttachShared(std::move(named["tracker"]),
                                                              d["tracker_pages"].get<uint64_t>()));
  if (minor_trap) {
    spec.memory_file = std::move(named["memory_file"]);
    if (!spec.memory_file) {
      return Error(ErrorCode::kProtocolError, "kept without its guest memory file");
    }
    spec.bitmap = std::move(named["bitmap"]);
  }
  std::unique_ptr<VcpuRequestTable> requests;
  if (spec.bitmap) {
    if (!named["requests"]) {
      return Error(ErrorCode::kProtocolError, "kept with a userfault bitmap but no request table");
    }
    GM_ASSIGN_OR_RETURN(requests, VcpuRequestTable::Attach(std::move(named["requests"])));
  }
  spec.resume = true;
  Connection c;
  c.vm = kept.id;
  c.name = spec.name;
  c.accepted = Clock::now();
  c.socket = std::move(named["connection"]);
  if (auto peer = GetPeerCredentials(c.socket.get()); peer && peer->pid > 0) c.pid = peer->pid;
  GM_RETURN_IF_ERROR(Watch(c.socket.get(), c.vm, EPOLLIN | EPOLLRDHUP));
  c.phase = Phase::kServing;
  const std::string name = c.name;
  auto [it, inserted] = connections.emplace(c.vm, std::move(c));
  Connection& vm = it->second;
  ++active_vms;
  if (vm.pid) vm_by_pid.emplace(*vm.pid, vm.vm);
  auto space = StartSpace(vm, std::move(spec), std::move(requests));
  if (!space) {
    Erase(vm.vm);  // counted as a VM that came and went
    --finished_vms;
    return std::move(space).error();
  }
  vm.space = *space;
  std::string note;
  if (vm.vcpu) {
    const std::string control = d.value("apf_control", "awaiting");
    vm.control = control == "exitless" ? Control::kExitless
                 : control == "none"   ? Control::kNoExitless
                                       : Control::kAwaiting;
    vm.control_may_linger = vm.control != Control::kAwaiting;
    if (vm.control == Control::kExitless) {
      if (ring_fds.empty() || ring_fds.size() % 3 != 0) {
        Drop(vm.vm,
             "kept with exitless APF but " + std::to_string(ring_fds.size()) + " ring descriptors");
        return OkStatus();
      }
      if (Status set = vm.vcpu->SetUpExitless(std::move(ring_fds)); !set) {
        Drop(vm.vm, set.error().ToString());
        return OkStatus();
      }
    }
    if (named["apf_socket"]) vm.vcpu->AttachApf(std::move(named["apf_socket"]));
    if (Status watched = WatchServing(vm); !watched) {
      Drop(vm.vm, watched.error().ToString());
      return OkStatus();
    }
    // What the predecessor took and did not answer: each gets its answer now.
    auto replayed = vm.vcpu->Replay(PostFor(vm));
    if (!replayed) {
      Drop(vm.vm, replayed.error().ToString());
      return OkStatus();
    }
    note = "; " + std::to_string(*replayed) + " vCPU fault(s) it had taken are answered again";
    // Message 2 was in before: what waited for it starts now.
    if (vm.control != Control::kAwaiting) StartBackgroundWork(vm);
    ready.push_back(Token(TokenKind::kConnection, vm.vm));
    if (vm.vcpu->apf_fd() >= 0) ready.push_back(Token(TokenKind::kApfSocket, vm.vm));
    for (size_t i = 0; i < vm.vcpu->ring_count(); ++i) {
      ready.push_back(Token(TokenKind::kRingNotify, vm.vm, i));
    }
  }
  Log(LogLevel::kInfo, name + ": taken over from the previous daemon; serving as space " +
                           std::to_string(*space) + note);
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
    if (shed) {
      metrics->HandshakeRejected(RejectReason::kShed);
      line += "closed a waiting connection; ";
    }
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
    metrics->HandshakeRejected(RejectReason::kDenied);
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
    metrics->HandshakeRejected(RejectReason::kPendingLimit);
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
  if (peer && peer->pid > 0) c.pid = peer->pid;
  c.deadline = now + options.handshake_timeout;
  c.reader.emplace();
  if (Status watched = Watch(socket.get(), vm, EPOLLIN | EPOLLRDHUP); !watched) {
    metrics->HandshakeRejected(RejectReason::kError);
    Log(LogLevel::kError, c.name + " rejected: " + watched.error().ToString());
    return;
  }
  c.socket = std::move(socket);
  deadlines.emplace(c.deadline, vm);
  ++pending_handshakes;
  if (c.pid) {
    vm_by_pid.emplace(*c.pid, vm);
    // Its APF connection came first, as Firecracker makes it.
    if (auto w = waiting_apf_by_pid.find(*c.pid); w != waiting_apf_by_pid.end()) {
      const uint64_t id = w->second;
      epoll_ctl(epoll.get(), EPOLL_CTL_DEL, waiting_apf.at(id).socket.get(), nullptr);
      c.early_apf = std::move(waiting_apf.at(id).socket);
      EraseWaitingApf(id);
    }
  }
  connections.emplace(vm, std::move(c));
}

// ---------------------------------------------------------------------------------------------
// Connections

void HandlerServer::Impl::TokenReady(uint64_t token, uint32_t events, bool again) {
  const uint64_t number = NumberOf(token);
  if (KindOf(token) == TokenKind::kWaitingApf) {
    // Only its hang-up is watched: it went away before its VM came.
    auto it = waiting_apf.find(number);
    if (it == waiting_apf.end()) return;
    apf_log.Log(LogLevel::kInfo, "an APF connection from pid " + std::to_string(it->second.pid) +
                                     " closed before its VM connected");
    EraseWaitingApf(number);
    return;
  }
  auto it = connections.find(number);
  if (it == connections.end()) return;
  Connection& c = it->second;
  switch (KindOf(token)) {
    case TokenKind::kConnection:
      if (c.phase == Phase::kHandshake) {
        HandshakeReady(c);
      } else if (c.phase == Phase::kServing && c.vcpu) {
        VcpuSocketReady(c, VcpuChannel::kUffdSocket, again ? EPOLLIN : events);
      } else if (c.phase == Phase::kServing) {
        ServingReady(c, events);
      }
      return;
    case TokenKind::kApfSocket:
      if (c.phase == Phase::kServing && c.vcpu && c.vcpu->apf_fd() >= 0) {
        VcpuSocketReady(c, VcpuChannel::kApfSocket, again ? EPOLLIN : events);
      }
      return;
    case TokenKind::kRingNotify: {
      const size_t index = IndexOf(token);
      if (c.phase != Phase::kServing || !c.vcpu || index >= c.vcpu->ring_count()) return;
      if (!again) c.vcpu->AcknowledgeNotify(index);
      RingReady(c, index);
      return;
    }
    case TokenKind::kWaitingApf:
      return;
  }
}

void HandlerServer::Impl::DropForToken(uint64_t token, const std::string& why) {
  if (KindOf(token) == TokenKind::kWaitingApf) {
    EraseWaitingApf(NumberOf(token));
  } else {
    Drop(NumberOf(token), why);
  }
}

void HandlerServer::Impl::ProcessReady() {
  std::vector<uint64_t> tokens;
  tokens.swap(ready);
  for (const uint64_t token : tokens) {
    try {
      TokenReady(token, 0, /*again=*/true);
    } catch (const std::exception& e) {
      DropForToken(token, e.what());
    }
  }
  const std::vector<uint64_t> retry(completion_retry.begin(), completion_retry.end());
  for (const uint64_t vm : retry) {
    auto it = connections.find(vm);
    if (it == connections.end() || !it->second.vcpu) {
      completion_retry.erase(vm);
      continue;
    }
    FinishVcpuBatch(it->second);
  }
}

void HandlerServer::Impl::HandshakeReady(Connection& c) {
  auto progress = c.reader->ReadFrom(c.socket.get());
  if (progress && *progress == HandshakeReader::Progress::kNeedMore) return;
  if (!progress) {
    if (progress.error().code() == ErrorCode::kPeerGone) {
      Log(LogLevel::kInfo, c.name + " closed before its handshake");
      Erase(c.vm);
    } else {
      Reject(c, RejectReason::kMalformed, progress.error().ToString());
    }
    return;
  }
  ReceivedHandshake handshake = c.reader->Take();
  const bool at_vm_limit = active_vms >= options.max_active_vms;
  Result<SpaceId> space = Admit(c, handshake);
  if (!space) {
    const ErrorCode code = space.error().code();
    const RejectReason reason = at_vm_limit ? RejectReason::kVmLimit
                                : code == ErrorCode::kInvalidArgument ||
                                        code == ErrorCode::kOutOfRange ||
                                        code == ErrorCode::kProtocolError
                                    ? RejectReason::kInvalid
                                    : RejectReason::kError;
    Reject(c, reason, space.error().ToString());
    return;
  }
  c.space = *space;
  SetPhase(c, Phase::kServing);
  std::string note;
  if (c.vcpu) {
    if (c.early_apf) c.vcpu->AttachApf(std::move(c.early_apf));
    if (Status watched = WatchServing(c); !watched) {
      Drop(c.vm, watched.error().ToString());
      return;
    }
    note = "; vCPU faults over its socket" +
           std::string(c.vcpu->apf_fd() >= 0 ? " and its APF socket" : "");
    ready.push_back(Token(TokenKind::kConnection, c.vm));  // message 2 may be there already
  } else if (c.early_apf) {
    apf_log.Log(LogLevel::kWarning, c.name +
                                        ": its APF connection is closed: a VM without a "
                                        "userfault bitmap has no vCPU faults to send there");
    c.early_apf.reset();
  }
  KeepVm(c);
  Log(LogLevel::kInfo, c.name + " connected: " + std::to_string(handshake.regions.size()) +
                           " region(s), " + std::to_string(handshake.fds.size()) +
                           " descriptor(s); serving as space " + std::to_string(c.space) + note +
                           (c.learned_pages > 0 ? "; prefetching " + std::to_string(c.learned_pages) +
                                                      " pages learned"
                                                : ""));
}

Result<SpaceId> HandlerServer::Impl::Admit(Connection& c, ReceivedHandshake& handshake) {
  if (active_vms >= options.max_active_vms) {
    return Error(ErrorCode::kResourceExhausted, "already serving " + std::to_string(active_vms) +
                                                    " VMs, the most allowed (--max-active-vms)");
  }
  GM_ASSIGN_OR_RETURN(const std::shared_ptr<const Snapshot> snapshot, CurrentSource());
  GM_RETURN_IF_ERROR(ValidateHandshake(handshake.regions, snapshot->size()));
  if (handshake.fds.empty()) {
    return Error(ErrorCode::kProtocolError, "no userfaultfd attached to the handshake");
  }
  VmSpec spec;
  spec.name = c.name;
  spec.regions = handshake.regions;
  spec.snapshot = snapshot;
  spec.fill = options.fill;
  spec.fill_bytes_per_second = options.fill_bytes_per_second;
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
    if (handshake.fds.size() >= 3) spec.bitmap = std::move(handshake.fds[2]);
  }
  return StartSpace(c, std::move(spec));
}

Result<SpaceId> HandlerServer::Impl::StartSpace(Connection& c, VmSpec spec,
                                                std::unique_ptr<VcpuRequestTable> requests) {
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
  std::vector<std::pair<std::string, UniqueFd>> kept_fds;
  auto keep_copy = [&](const char* role, int fd) -> Status {
    UniqueFd copy(fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!copy) return PosixError(errno, std::string("duplicating the ") + role + " for the keeper");
    kept_fds.emplace_back(role, std::move(copy));
    return OkStatus();
  };
  GM_RETURN_IF_ERROR(keep_copy("uffd", spec.uffd.get()));
  GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Adopt(std::move(spec.uffd)));

  FaultHandlerOptions handler_options;
  handler_options.name = spec.name;
  handler_options.fill = spec.fill;
  handler_options.fill_bytes_per_second = spec.fill_bytes_per_second;
  handler_options.fault_around_bytes = spec.fault_around_bytes;
  handler_options.resume = spec.resume;
  const uint64_t tracker_pages = layout.file_end() / kPageSize4K;
  if (spec.tracker == nullptr) {
    GM_ASSIGN_OR_RETURN(spec.tracker, PageTracker::CreateShared(tracker_pages));
  }
  GM_RETURN_IF_ERROR(keep_copy("tracker", spec.tracker->shared_fd()));
  handler_options.tracker = spec.tracker;
  // Learned from at its end; a VM taken over is not: what it needed before is not known.
  std::shared_ptr<WorkingSetRecorder> recorder;
  std::shared_ptr<const WorkingSet> learned;
  if (learner && !spec.resume && spec.snapshot->file() != nullptr) {
    learned = learner->LearnedFor(*spec.snapshot->file(), spec.snapshot->packed_working_set());
    recorder = std::make_shared<WorkingSetRecorder>();
    handler_options.recorder = recorder;
  } else if (learner && !spec.resume && !spec.snapshot->packed_working_set().empty()) {
    // A snapshot named by a URL: what it was packed with, as nothing is learned of it.
    learned = std::make_shared<const WorkingSet>(
        WorkingSet::Merge(WorkingSet(), spec.snapshot->packed_working_set()));
  }
  bool has_bitmap = false;
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
    GM_RETURN_IF_ERROR(keep_copy("memory_file", guest_memfd_fd));
    if (spec.bitmap) {
      // One bit per 4 KiB page of the guest memory file; cleared once a page's content is in.
      // Firecracker seals it; unsealed, it could shrink under the daemon's mapping (a SIGBUS).
      const int seals = fcntl(spec.bitmap.get(), F_GET_SEALS);
      if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
        return Error(ErrorCode::kInvalidArgument,
                     "the userfault bitmap is not a memfd sealed against shrinking "
                     "(F_SEAL_SHRINK), as Firecracker seals it");
      }
      GM_RETURN_IF_ERROR(keep_copy("bitmap", spec.bitmap.get()));
      auto bitmap = UserfaultBitmap::Map(std::move(spec.bitmap), file_size);
      if (!bitmap) return std::move(bitmap).error().WithContext("the userfault bitmap");
      handler_options.userfault_bitmap = std::move(*bitmap);
      has_bitmap = true;
    }
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
  std::unique_ptr<VcpuFaults> vcpu;
  if (has_bitmap) {
    // vCPU faults come over the sockets and rings; what is taken and not answered is kept.
    if (requests == nullptr) {
      GM_ASSIGN_OR_RETURN(requests, VcpuRequestTable::Create());
    }
    GM_RETURN_IF_ERROR(keep_copy("requests", requests->fd()));
    vcpu = std::make_unique<VcpuFaults>(spec.name, c.socket.get(), std::move(requests));
  }
  // A secret-hiding VM's working set waits for its message 2: Firecracker sets every bit of the
  // bitmap after message 1, so bits cleared before it would be set again.
  // Its background fill too, for the same reason; the fill of a VM taken over waits as well,
  // unless its message 2 was in already (Resume starts it then).
  c.learned_pages = learned != nullptr ? learned->size() : 0;
  if (has_bitmap) {
    c.deferred_prefetch = std::move(learned);
    c.deferred_fill = handler_options.fill == FillMode::kBackground;
    if (c.deferred_fill) handler_options.fill = FillMode::kNone;
  } else {
    handler_options.prefetch = std::move(learned);
  }
  const bool minor_trap = handler_options.mode == InstallMode::kMinorTrap;
  if (!options.trace_dir.empty()) handler_options.trace = OpenTrace(c, *spec.snapshot);
  GM_ASSIGN_OR_RETURN(auto handler,
                      FaultHandler::Create(std::move(uffd), std::move(layout),
                                           spec.snapshot->source(),
                                           std::move(handler_options)));
  // The connection's record exists before the space does: whenever the space ends, its notice
  // finds the record.
  const uint64_t vm = c.vm;
  GM_ASSIGN_OR_RETURN(SpaceId space,
                      engine->AddSpace(std::move(handler), [this, vm](SpaceId id, const Status& why,
                                                                      const FaultStats& stats) {
                        OnSpaceClosed(vm, id, why, stats);
                      }));
  c.description = {{"name", spec.kept_name.empty() ? spec.name : spec.kept_name},
                   {"snapshot", spec.snapshot->path()},
                   {"regions", nlohmann::json::parse(EncodeHandshake(spec.regions))},
                   {"fault_all", spec.fill == FillMode::kAtFirstFault},  // for older daemons
                   {"fill", FillName(spec.fill)},
                   {"fault_around_bytes", spec.fault_around_bytes},
                   {"tracker_pages", tracker_pages},
                   {"minor_trap", minor_trap},
                   {"bitmap", has_bitmap}};
  c.kept_fds = std::move(kept_fds);
  c.vcpu = std::move(vcpu);
  c.recorder = std::move(recorder);
  c.snapshot = spec.snapshot;
  metrics->VmStarted(space, VmLabels{c.vm, c.pid.value_or(0), spec.snapshot->path()});
  return space;
}

std::shared_ptr<RestoreTraceWriter> HandlerServer::Impl::OpenTrace(const Connection& c,
                                                                   const Snapshot& snapshot) {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const uint64_t unix_ns =
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count());
  const std::string path = options.trace_dir + "/vm-" + std::to_string(c.vm) + "-pid-" +
                           std::to_string(c.pid.value_or(0)) + "-" +
                           std::to_string(unix_ns / 1'000'000) + ".gmtrace";
  auto writer = RestoreTraceWriter::Create(
      path, {c.name, c.pid.value_or(0), snapshot.path(), snapshot.size() / kPageSize4K, unix_ns});
  if (!writer) {
    // The VM is served all the same; only its trace is missing.
    Log(LogLevel::kWarning, c.name + ": no restore trace: " + writer.error().ToString());
    return nullptr;
  }
  Log(LogLevel::kInfo, c.name + ": restore trace " + path);
  // Its last records are written when its handler lets it go: said, for whoever reads it then.
  return std::shared_ptr<RestoreTraceWriter>(
      writer->release(), [name = c.name, path](RestoreTraceWriter* w) {
        delete w;
        Log(LogLevel::kInfo, name + ": restore trace " + path + " complete");
      });
}

Result<std::shared_ptr<const Snapshot>> HandlerServer::Impl::OpenSnapshot(
    const std::string& path) {
  PackedSourceOptions packed{.cache_bytes = options.chunk_cache_bytes};
  if (!ObjectUrl::Names(path)) return Snapshot::Open(path, cache ? &*cache : nullptr, packed);
  if (!remote) {
    GM_ASSIGN_OR_RETURN(remote, OpenRemoteAccess());
  }
  // Each background thread fetches a chunk at a time: as many requests in flight.
  packed.decode_threads = options.fetch_threads;
  return Snapshot::Open(path, nullptr, packed, &*remote);
}

Result<RemoteAccess> HandlerServer::Impl::OpenRemoteAccess() const {
  RemoteAccess access{.fetch_deadline = options.fetch_deadline};
  ObjectStoreOptions store_options = options.object_store;
  store_options.max_connections = std::max(store_options.max_connections, options.fetch_threads);
  GM_ASSIGN_OR_RETURN(access.store, ObjectStore::Create(std::move(store_options)));
  const std::string cache_dir =
      (options.cache_dir.empty() ? SnapshotCache::DefaultDirectory() : options.cache_dir) +
      "/chunks";
  if (auto disk = DiskChunkCache::Open(cache_dir, options.chunk_disk_bytes); disk) {
    access.disk_cache = std::move(*disk);
    const DiskChunkCache::Counters kept = access.disk_cache->counters();
    Log(LogLevel::kInfo, "chunk cache " + cache_dir + ": " + std::to_string(kept.entries) +
                             " chunks (" + std::to_string(kept.bytes >> 20) + " MiB) of at most " +
                             std::to_string(options.chunk_disk_bytes >> 20) + " MiB");
  } else {
    Log(LogLevel::kWarning, "the chunk cache " + cache_dir + " cannot be used (" +
                                disk.error().ToString() +
                                "): every restore fetches its chunks from the store");
  }
  return access;
}

void HandlerServer::Impl::KeepVm(Connection& c) {
  if (keeper == nullptr || c.kept_fds.empty()) return;
  nlohmann::json d = c.description;
  std::vector<int> fds;
  nlohmann::json roles = nlohmann::json::array();
  auto add = [&](const std::string& role, int fd) {
    roles.push_back(role);
    fds.push_back(fd);
  };
  // The uffd first and the connection second (the one whose hang-up means the VM is gone).
  add(c.kept_fds[0].first, c.kept_fds[0].second.get());
  add("connection", c.socket.get());
  for (size_t i = 1; i < c.kept_fds.size(); ++i)
    add(c.kept_fds[i].first, c.kept_fds[i].second.get());
  if (c.vcpu) {
    if (c.vcpu->apf_fd() >= 0) add("apf_socket", c.vcpu->apf_fd());
    const std::vector<int> rings = c.vcpu->ring_fds();
    for (size_t i = 0; i < rings.size(); ++i) {
      static const char* const kRingRoles[] = {"ring_notify", "ring_complete", "ring_vcpu"};
      add(kRingRoles[i % 3], rings[i]);
    }
    d["apf_control"] = c.control == Control::kAwaiting   ? "awaiting"
                       : c.control == Control::kExitless ? "exitless"
                                                         : "none";
  }
  d["fds"] = std::move(roles);
  if (fds.size() > kMaxKeptFds) {
    Log(LogLevel::kWarning, c.name + " is served but not kept (a restart would lose it): " +
                                std::to_string(fds.size()) + " descriptors, more than the " +
                                std::to_string(kMaxKeptFds) + " a message can carry");
    return;
  }
  if (Status kept = keeper->Keep(c.vm, d.dump(), fds, /*watch=*/1); !kept) {
    Log(LogLevel::kWarning,
        c.name + " is served but not kept (a restart would lose it): " + kept.error().ToString());
  }
}

Result<std::shared_ptr<const Snapshot>> HandlerServer::Impl::CurrentSource() {
  if (source->file() == nullptr) return source;  // an object named by its URL does not change
  auto changed = source->file()->WhatChanged();
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
  const bool identity_changed = (*reopened)->file() == nullptr ||
                                (*reopened)->file()->identity() != source->file()->identity();
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
    Reject(c, RejectReason::kTimeout,
           "no complete handshake within " + std::to_string(options.handshake_timeout.count()) +
               " ms (" + std::to_string(c.reader->bytes_received()) + " bytes received)");
  }
  while (!apf_deadlines.empty() && apf_deadlines.begin()->first <= now) {
    const uint64_t id = apf_deadlines.begin()->second;
    apf_log.Log(LogLevel::kWarning,
                "an APF connection from pid " + std::to_string(waiting_apf.at(id).pid) +
                    " was not followed by its VM's Uffd connection within " +
                    std::to_string(options.handshake_timeout.count()) + " ms; closed");
    EraseWaitingApf(id);
  }
}

void HandlerServer::Impl::Reject(Connection& c, RejectReason reason, const std::string& why) {
  metrics->HandshakeRejected(reason);
  Log(LogLevel::kError, c.name + " rejected: " + why);
  Erase(c.vm);
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
  SignalEventFd(notice_fd.get());
}

void HandlerServer::Impl::HandleNotices() {
  std::vector<SpaceEnded> notices;
  std::vector<GuestFaultDone> done;
  {
    std::lock_guard lock(mu);
    notices.swap(ended);
    done.swap(guest_done);
  }
  // Served vCPU faults first: their answers go out in one batch per VM.
  std::vector<uint64_t> answered;
  for (GuestFaultDone& d : done) {
    auto it = connections.find(d.vm);
    if (it == connections.end() || it->second.phase != Phase::kServing || !it->second.vcpu) {
      continue;
    }
    Connection& c = it->second;
    if (!d.status) {
      const Error& e = d.status.error();
      Drop(c.vm, e.code() == ErrorCode::kOutOfRange
                     ? "protocol error: a vCPU fault outside the VM's memory: " + e.context()
                     : "a vCPU fault could not be served: " + e.ToString());
      continue;
    }
    c.vcpu->Complete(d.slot);
    if (answered.empty() || answered.back() != d.vm) answered.push_back(d.vm);
  }
  std::sort(answered.begin(), answered.end());
  answered.erase(std::unique(answered.begin(), answered.end()), answered.end());
  for (const uint64_t vm : answered) {
    auto it = connections.find(vm);
    if (it != connections.end() && it->second.vcpu) FinishVcpuBatch(it->second);
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
    UnwatchServing(c);
    c.socket.reset();
    c.vcpu.reset();  // its statistics note is lost with it; the space's own come with the notice
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
    metrics->HandshakeRejected(RejectReason::kError);
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
  const std::string vcpu_note = c.vcpu ? c.vcpu->StatsNote() : "";
  Log(level, vcpu_note.empty() ? line : line + "; " + vcpu_note);
  if (c.recorder != nullptr && level == LogLevel::kInfo) {
    // A VM that ended well (not dropped, not failed) is what the next restores will look like.
    const std::vector<uint64_t> needed = c.recorder->Take();
    if (auto learned = learner->Learn(*c.snapshot->file(), needed, c.recorder->prefetched())) {
      Log(LogLevel::kDebug, c.name + ": its faults needed " + std::to_string(needed.size()) +
                                " pages; the working set of " + c.snapshot->path() + " is " +
                                std::to_string(learned->size()) + " pages after " +
                                std::to_string(learned->restores()) + " restores");
    }
  }
  const std::string name = c.name;
  metrics->VmFinished(c.vm, stats);
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
  UnwatchServing(c);
  if (c.pid) {
    auto by_pid = vm_by_pid.find(*c.pid);
    if (by_pid != vm_by_pid.end() && by_pid->second == vm) vm_by_pid.erase(by_pid);
  }
  completion_retry.erase(vm);
  connections.erase(it);  // closes the socket
}

}  // namespace guestmem::cli
