#include "soak/launcher.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <map>
#include <thread>

namespace guestmem::soak {
namespace {

bool SendEvent(int fd, const LauncherEvent& event) {
  while (true) {
    const ssize_t n = send(fd, &event, sizeof(event), MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(sizeof(event))) return true;
    if (n < 0 && errno == EINTR) continue;
    return false;
  }
}

// The launcher process: serves spawn requests until the driver closes its end.
[[noreturn]] void LauncherMain(int control, const Launcher::VmMain& vm_main) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() == 1) _exit(1);  // the driver is already gone
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  const int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) _exit(1);

  std::map<pid_t, uint32_t> vms;
  auto reap = [&](bool block) {
    while (true) {
      int status = 0;
      const pid_t pid = waitpid(-1, &status, block ? 0 : WNOHANG);
      if (pid <= 0) {
        if (pid < 0 && errno == EINTR) continue;
        return;
      }
      auto it = vms.find(pid);
      if (it == vms.end()) continue;  // an orphan a VM left behind
      SendEvent(control, {LauncherEvent::Kind::kExited, it->second, pid, status});
      vms.erase(it);
    }
  };

  while (true) {
    pollfd fds[2] = {{control, POLLIN, 0}, {sfd, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if ((fds[1].revents & POLLIN) != 0) {
      signalfd_siginfo info[8];
      while (read(sfd, info, sizeof(info)) > 0) {
      }
      reap(false);
    }
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
    SpawnRequest request;
    const ssize_t n = recv(control, &request, sizeof(request), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(sizeof(request))) break;  // the driver is done (or broken)
    const pid_t pid = fork();
    if (pid == 0) {
      sigprocmask(SIG_UNBLOCK, &chld, nullptr);
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      prctl(PR_SET_CHILD_SUBREAPER, 0);
      close_range(3, ~0U, 0);
      _exit(vm_main(request));
    }
    if (pid < 0) {
      SendEvent(control, {LauncherEvent::Kind::kExited, request.index, -1, errno});
      continue;
    }
    setpgid(pid, pid);  // also here, so that the group exists before anyone kills it
    vms[pid] = request.index;
    SendEvent(control, {LauncherEvent::Kind::kSpawned, request.index, pid, 0});
  }
  for (const auto& [pid, index] : vms) kill(-pid, SIGKILL);
  reap(true);
  _exit(0);
}

}  // namespace

Result<std::unique_ptr<Launcher>> Launcher::Start(VmMain vm_main) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    return PosixError(errno, "soak launcher: socketpair");
  }
  UniqueFd driver_end(sv[0]);
  UniqueFd launcher_end(sv[1]);
  const pid_t pid = fork();
  if (pid < 0) return PosixError(errno, "soak launcher: fork");
  if (pid == 0) {
    driver_end.reset();
    LauncherMain(launcher_end.get(), vm_main);
  }
  return std::unique_ptr<Launcher>(new Launcher(std::move(driver_end), pid));
}

Launcher::~Launcher() {
  control_.reset();  // the launcher kills what is left and exits
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (true) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) return;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

Status Launcher::Spawn(const SpawnRequest& request) {
  while (true) {
    const ssize_t n = send(control_.get(), &request, sizeof(request), MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(sizeof(request))) return OkStatus();
    if (n < 0 && errno == EINTR) continue;
    return PosixError(n < 0 ? errno : EPIPE, "soak launcher: request a VM");
  }
}

Result<std::optional<LauncherEvent>> Launcher::Next() {
  LauncherEvent event;
  while (true) {
    const ssize_t n = recv(control_.get(), &event, sizeof(event), MSG_DONTWAIT);
    if (n == static_cast<ssize_t>(sizeof(event))) return std::optional<LauncherEvent>(event);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return std::optional<LauncherEvent>();
    return Error(ErrorCode::kPeerGone, "soak launcher: it is gone");
  }
}

}  // namespace guestmem::soak
