#include "serve/handler_server.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "guestmem/fault_engine.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/log.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfaultfd.h"

namespace guestmem::cli {
namespace {

using Clock = std::chrono::steady_clock;

std::string Seconds(Clock::duration d) {
  char buf[32];
  (void)std::snprintf(buf, sizeof(buf), "%.3fs", std::chrono::duration<double>(d).count());
  return buf;
}

std::string PeerName(uint64_t vm, const std::optional<PeerCredentials>& peer) {
  std::string name = "vm " + std::to_string(vm);
  if (peer) {
    name += " (pid " + std::to_string(peer->pid) + ", uid " + std::to_string(peer->uid) + ")";
  }
  return name;
}

}  // namespace

struct HandlerServer::Impl {
  struct Connection {
    UniqueFd socket;
    SpaceId space = 0;
    std::string name;
    Clock::time_point started;
    FaultStats final_stats;  // set when the space ended by itself
  };

  ServeOptions options;
  std::shared_ptr<const PageSource> source;
  std::unique_ptr<FaultEngine> engine;
  UniqueFd listener;
  UniqueFd stop_fd;  // eventfd: Stop() was called
  UniqueFd wake_fd;  // eventfd: a connection was added or a space ended by itself
  std::atomic<uint64_t> next_vm{1};

  std::mutex mu;
  std::condition_variable handshakes_done;
  int handshakes_in_flight = 0;                                    // GUARDED_BY(mu)
  std::deque<Connection> new_connections;                          // GUARDED_BY(mu)
  std::deque<std::pair<SpaceId, FaultStats>> ended_by_themselves;  // GUARDED_BY(mu)
  std::map<SpaceId, Connection> connections;                       // main loop only
  int finished_vms = 0;                                            // main loop only

  static void Signal(int fd) {
    uint64_t one = 1;
    ssize_t rc = write(fd, &one, sizeof(one));
    (void)rc;
  }
  static void Drain(int fd) {
    uint64_t count;
    ssize_t rc = read(fd, &count, sizeof(count));
    (void)rc;
  }

  void AcceptAll();
  void Handshake(UniqueFd socket, uint64_t vm);
  Result<SpaceId> Admit(const std::string& name, ReceivedHandshake& handshake);
  void Disconnect(SpaceId space, const char* why);
  void OnSpaceClosed(SpaceId space, const Status& why, const FaultStats& stats);
};

Result<std::unique_ptr<HandlerServer>> HandlerServer::Start(const ServeOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> source,
                      RawFileSource::Open(options.mem_file_path));
  impl->source = std::move(source);
  GM_ASSIGN_OR_RETURN(impl->engine, FaultEngine::Start({.workers = options.workers}));
  UnixListenOptions listen;
  listen.mode = options.socket_mode;
  listen.owner = options.socket_owner;
  listen.group = options.socket_group;
  GM_ASSIGN_OR_RETURN(impl->listener, ListenUnix(options.socket_path, listen));
  impl->stop_fd.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  impl->wake_fd.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->stop_fd || !impl->wake_fd) return PosixError(errno, "serve: eventfd");

  char mode[8];
  (void)std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(options.socket_mode));
  Log(LogLevel::kInfo,
      "serving " + impl->source->Describe() + " on " + options.socket_path + " (mode " + mode +
          ") with " + std::to_string(impl->engine->worker_count()) + " workers, " +
          (options.fault_all
               ? std::string("fault-all")
               : "on demand with " + std::to_string(options.fault_around_bytes / 1024) +
                     " KiB fault-around"));
  return std::unique_ptr<HandlerServer>(new HandlerServer(std::move(impl)));
}

HandlerServer::HandlerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HandlerServer::~HandlerServer() {
  Stop();
  {
    // Handshake threads time out on their own; they must be gone before the state they use.
    std::unique_lock lock(impl_->mu);
    impl_->handshakes_done.wait(lock, [&] { return impl_->handshakes_in_flight == 0; });
  }
  impl_->engine.reset();  // closes whatever is still served
  unlink(impl_->options.socket_path.c_str());
}

void HandlerServer::Stop() { Impl::Signal(impl_->stop_fd.get()); }

Status HandlerServer::Run() {
  Impl& s = *impl_;
  std::vector<pollfd> fds;
  std::vector<SpaceId> owners;  // owners[i] is the space of fds[i], for i >= 3
  while (true) {
    {
      std::lock_guard lock(s.mu);
      while (!s.new_connections.empty()) {
        Impl::Connection c = std::move(s.new_connections.front());
        s.new_connections.pop_front();
        SpaceId id = c.space;
        s.connections.emplace(id, std::move(c));
      }
    }
    std::deque<std::pair<SpaceId, FaultStats>> ended;
    {
      std::lock_guard lock(s.mu);
      ended.swap(s.ended_by_themselves);
    }
    for (auto& [id, stats] : ended) {
      if (auto it = s.connections.find(id); it != s.connections.end()) {
        it->second.final_stats = stats;
      }
      s.Disconnect(id, "ended");
    }
    if (s.options.max_vms > 0 && s.finished_vms >= s.options.max_vms) break;

    fds.clear();
    owners.clear();
    fds.push_back({s.stop_fd.get(), POLLIN, 0});
    fds.push_back({s.wake_fd.get(), POLLIN, 0});
    fds.push_back({s.listener.get(), POLLIN, 0});
    for (auto& [id, c] : s.connections) {
      fds.push_back({c.socket.get(), POLLIN | POLLRDHUP, 0});
      owners.push_back(id);
    }
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return PosixError(errno, "serve: poll");
    }
    if (fds[0].revents != 0) {
      Log(LogLevel::kInfo,
          "shutting down: " + std::to_string(s.connections.size()) + " VM(s) still connected");
      break;
    }
    if (fds[1].revents != 0) Impl::Drain(s.wake_fd.get());
    if (fds[2].revents != 0) s.AcceptAll();
    for (size_t i = 3; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      // Firecracker never writes after the handshake and never closes while it lives: any
      // readable state is the hang-up (or bytes we discard).
      char discard[256];
      ssize_t n = recv(fds[i].fd, discard, sizeof(discard), MSG_DONTWAIT);
      if (n > 0 && (fds[i].revents & (POLLHUP | POLLRDHUP | POLLERR)) == 0) continue;
      s.Disconnect(owners[i - 3], "disconnected");
    }
  }
  // Graceful: every VM still here is detached and freed, with its statistics logged.
  while (!s.connections.empty()) s.Disconnect(s.connections.begin()->first, "detached at shutdown");
  return OkStatus();
}

void HandlerServer::Impl::AcceptAll() {
  while (true) {
    UniqueFd socket(accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!socket) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        Log(LogLevel::kWarning, "accept: " + PosixError(errno, "").ToString());
      }
      return;
    }
    const uint64_t vm = next_vm.fetch_add(1);
    {
      std::lock_guard lock(mu);
      ++handshakes_in_flight;
    }
    std::thread([this, vm, sock = std::move(socket)]() mutable {
      Handshake(std::move(sock), vm);
      std::lock_guard lock(mu);
      --handshakes_in_flight;
      handshakes_done.notify_all();
    }).detach();
    // One connection per readiness report keeps a flood from starving the other sockets; the
    // listener stays readable if more are queued.
    return;
  }
}

void HandlerServer::Impl::Handshake(UniqueFd socket, uint64_t vm) {
  std::optional<PeerCredentials> peer;
  if (auto creds = GetPeerCredentials(socket.get())) peer = *creds;
  const std::string name = PeerName(vm, peer);
  const Clock::time_point started = Clock::now();
  auto received = ReceiveHandshake(socket.get(), options.handshake_timeout);
  Result<SpaceId> space = received ? Admit(name, *received) : Result<SpaceId>(received.error());
  if (!space) {
    Log(LogLevel::kError, name + " rejected: " + space.error().ToString());
    return;  // closes the connection
  }
  Log(LogLevel::kInfo, name + " connected: " + std::to_string(received->regions.size()) +
                           " region(s), " + std::to_string(received->fds.size()) +
                           " descriptor(s); serving as space " + std::to_string(*space));
  std::lock_guard lock(mu);
  new_connections.push_back(Connection{std::move(socket), *space, name, started});
  Signal(wake_fd.get());
}

Result<SpaceId> HandlerServer::Impl::Admit(const std::string& name, ReceivedHandshake& handshake) {
  GM_RETURN_IF_ERROR(ValidateHandshake(handshake.regions, source->size()));
  if (handshake.fds.empty()) {
    return Error(ErrorCode::kProtocolError, "no userfaultfd attached to the handshake");
  }
  std::vector<GuestRegion> regions;
  bool guest_memfd = false;
  for (const HandshakeRegion& r : handshake.regions) {
    guest_memfd = guest_memfd || r.is_guest_memfd.value_or(false);
    regions.push_back(GuestRegion{GuestPhysAddr(r.gpa_start.value_or(r.offset)), r.size,
                                  FileOffset(r.offset), HostVirtAddr(r.base_host_virt_addr),
                                  r.page_size});
  }
  GM_ASSIGN_OR_RETURN(GuestLayout layout, GuestLayout::Create(std::move(regions)));

  GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Adopt(std::move(handshake.fds[0])));

  FaultHandlerOptions handler_options;
  handler_options.name = name;
  handler_options.fault_all = options.fault_all;
  handler_options.fault_around_bytes = options.fault_around_bytes;
  if (guest_memfd) {
    // The secret-hiding variant: uffd, guest memory file, bitmap. Content goes into the file,
    // then UFFDIO_CONTINUE maps it (the full minor trap).
    if (handshake.fds.size() < 2) {
      return Error(ErrorCode::kProtocolError,
                   "is_guest_memfd is set but no guest memory file descriptor was attached");
    }
    const int guest_memfd_fd = handshake.fds[1].get();
    struct stat st {};
    if (fstat(guest_memfd_fd, &st) != 0) return PosixError(errno, "fstat of the guest memory file");
    // Firecracker's guest_memfd is exactly the regions back to back: it covers every region and
    // is no larger than the snapshot. Checked before anything is sized from it.
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    uint64_t regions_end = 0;
    for (const HandshakeRegion& r : handshake.regions) {
      regions_end = std::max(regions_end, r.offset + r.size);  // validated: no overflow
    }
    if (file_size < regions_end) {
      return Error(ErrorCode::kInvalidArgument,
                   "the guest memory file (" + std::to_string(file_size) +
                       " bytes) does not cover the regions, which end at byte " +
                       std::to_string(regions_end));
    }
    if (file_size > source->size()) {
      return Error(ErrorCode::kInvalidArgument,
                   "the guest memory file (" + std::to_string(file_size) +
                       " bytes) is larger than the snapshot (" + std::to_string(source->size()) +
                       " bytes); it must be the regions back to back");
    }
    MemoryFileOptions file_options;
    file_options.name = name;
    file_options.size_bytes = file_size;
    file_options.max_size_bytes = source->size();
    GM_ASSIGN_OR_RETURN(file_options.backend, IdentifyBackend(guest_memfd_fd));
    GM_ASSIGN_OR_RETURN(auto memory_file,
                        MemoryFile::Adopt(std::move(handshake.fds[1]), file_options));
    handler_options.mode = InstallMode::kMinorTrap;
    handler_options.memory_file = std::move(memory_file);
  }
  GM_ASSIGN_OR_RETURN(auto handler, FaultHandler::Create(std::move(uffd), std::move(layout), source,
                                                         std::move(handler_options)));
  return engine->AddSpace(std::move(handler),
                          [this](SpaceId id, const Status& why, const FaultStats& stats) {
                            OnSpaceClosed(id, why, stats);
                          });
}

void HandlerServer::Impl::OnSpaceClosed(SpaceId space, const Status& why, const FaultStats& stats) {
  if (why) return;  // removed by Disconnect, which logs
  const bool exited = why.error().code() == ErrorCode::kPeerGone;
  Log(exited ? LogLevel::kInfo : LogLevel::kError,
      "space " + std::to_string(space) + (exited ? " finished: " : " failed: ") +
          why.error().ToString() + "; " + stats.ToString());
  std::lock_guard lock(mu);
  ended_by_themselves.emplace_back(space, stats);
  Signal(wake_fd.get());
}

void HandlerServer::Impl::Disconnect(SpaceId space, const char* why) {
  auto it = connections.find(space);
  if (it == connections.end()) return;  // may still be in new_connections: next loop
  Connection c = std::move(it->second);
  connections.erase(it);
  auto stats = engine->RemoveSpace(space);
  std::string line = c.name + " " + why + " after " + Seconds(Clock::now() - c.started);
  if (stats) line += ": " + stats->ToString();
  Log(LogLevel::kInfo, line);
  if (options.on_vm_finished) options.on_vm_finished(c.name, stats.value_or(c.final_stats));
  ++finished_vms;
}

}  // namespace guestmem::cli
