// The server loop's part for Firecracker's APF socket (HandlerServer::Impl; see
// handler_server_impl.h), with --apf: its connections accepted, each paired with the VM whose Uffd
// connection comes from the same process (SO_PEERCRED). Firecracker connects it before its Uffd
// socket, so a connection may wait for its VM (bounded in number, each until the handshake
// timeout), be held by a VM still in its handshake, or join a VM being served.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <cerrno>
#include <optional>
#include <string>
#include <utility>

#include "guestmem/log.h"
#include "guestmem/unix_socket.h"
#include "serve/handler_server_impl.h"

namespace guestmem::cli {

void HandlerServer::Impl::AcceptApfReady(Clock::time_point now) {
  for (int i = 0; i < kAcceptsPerTurn; ++i) {
    const int fd = accept4(apf_listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      AddApfConnection(UniqueFd(fd), now);
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return;
    if (err == EINTR || err == ECONNABORTED) continue;
    // Out of descriptors or memory: take the waiting connection through the reserve descriptor
    // and close it, so that the listener does not stay readable and spin the loop.
    apf_log.Log(LogLevel::kError, "APF socket: accept: " + PosixError(err, "").ToString() +
                                      "; a waiting APF connection is closed");
    reserve.reset();
    UniqueFd shed(accept4(apf_listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    shed.reset();
    reserve.reset(open("/dev/null", O_RDONLY | O_CLOEXEC));
    return;
  }
}

void HandlerServer::Impl::AddApfConnection(UniqueFd socket, Clock::time_point now) {
  std::optional<PeerCredentials> peer;
  if (auto creds = GetPeerCredentials(socket.get())) peer = std::move(*creds);
  if (!Allowed(peer)) {
    denied_log.Log(LogLevel::kWarning, "refused an APF connection from " +
                                           (peer ? "pid " + std::to_string(peer->pid)
                                                 : std::string("an unknown peer")) +
                                           ": not allowed by --allow-uid/--allow-gid");
    return;
  }
  if (!peer || peer->pid <= 0) {
    apf_log.Log(LogLevel::kWarning,
                "refused an APF connection whose peer is unknown: it cannot be "
                "paired with its VM's Uffd connection");
    return;
  }
  const pid_t pid = peer->pid;
  // Firecracker connects it first, then its Uffd socket: both come from the one process.
  if (auto v = vm_by_pid.find(pid); v != vm_by_pid.end()) {
    Connection& c = connections.at(v->second);
    if (c.phase == Phase::kHandshake && !c.early_apf) {
      c.early_apf = std::move(socket);
      return;
    }
    if (c.phase == Phase::kServing && c.vcpu && c.vcpu->apf_fd() < 0) {
      AttachApf(c, std::move(socket));
      return;
    }
    apf_log.Log(LogLevel::kWarning, "refused an APF connection from pid " + std::to_string(pid) +
                                        ": " + c.name +
                                        " has one already, or no vCPU faults to send there");
    return;
  }
  if (waiting_apf_by_pid.count(pid) != 0) {
    apf_log.Log(LogLevel::kWarning, "refused a second APF connection from pid " +
                                        std::to_string(pid) + " before its VM connected");
    return;
  }
  if (waiting_apf.size() >= options.max_pending_handshakes) {
    refused_log.Log(LogLevel::kWarning,
                    "refused an APF connection: " + std::to_string(waiting_apf.size()) +
                        " wait for their VMs, the most allowed "
                        "(--max-pending-handshakes)");
    return;
  }
  const uint64_t id = next_waiting_apf++;
  // Only its hang-up is watched until its VM comes: nothing is read from it before.
  if (Status watched = Watch(socket.get(), Token(TokenKind::kWaitingApf, id), EPOLLRDHUP);
      !watched) {
    apf_log.Log(LogLevel::kError, "refused an APF connection: " + watched.error().ToString());
    return;
  }
  const Clock::time_point deadline = now + options.handshake_timeout;
  waiting_apf.emplace(id, WaitingApf{std::move(socket), pid, deadline});
  waiting_apf_by_pid.emplace(pid, id);
  apf_deadlines.emplace(deadline, id);
}

void HandlerServer::Impl::AttachApf(Connection& c, UniqueFd socket) {
  c.vcpu->AttachApf(std::move(socket));
  if (Status watched = Watch(c.vcpu->apf_fd(), Token(TokenKind::kApfSocket, c.vm),
                             EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET);
      !watched) {
    c.vcpu->DetachApf();
    Log(LogLevel::kError, c.name + ": its APF connection is closed: " + watched.error().ToString());
    return;
  }
  Log(LogLevel::kInfo, c.name + ": its APF socket connected");
  KeepVm(c);
  ready.push_back(Token(TokenKind::kApfSocket, c.vm));
}

void HandlerServer::Impl::EraseWaitingApf(uint64_t id) {
  auto it = waiting_apf.find(id);
  if (it == waiting_apf.end()) return;
  if (it->second.socket) epoll_ctl(epoll.get(), EPOLL_CTL_DEL, it->second.socket.get(), nullptr);
  apf_deadlines.erase({it->second.deadline, id});
  auto by_pid = waiting_apf_by_pid.find(it->second.pid);
  if (by_pid != waiting_apf_by_pid.end() && by_pid->second == id) waiting_apf_by_pid.erase(by_pid);
  waiting_apf.erase(it);
}

}  // namespace guestmem::cli
