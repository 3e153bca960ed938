#include "guestmem/unix_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

namespace guestmem {
namespace {

Result<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Error(ErrorCode::kInvalidArgument,
                 "unix socket path '" + path + "' is " + std::to_string(path.size()) +
                     " bytes; it must be 1 to " + std::to_string(sizeof(addr.sun_path) - 1) +
                     " bytes (the size of sun_path less its terminator)");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

const sockaddr* AsSockaddr(const sockaddr_un& addr) {
  return reinterpret_cast<const sockaddr*>(&addr);
}

// Whether a process listens on the socket file at `addr` (kAlreadyExists if so). A non-blocking
// probe: a listener with a full backlog answers EAGAIN instead of making us wait.
Status CheckNobodyListens(const sockaddr_un& addr) {
  UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!probe) return PosixError(errno, "listen_unix: socket for probing");
  if (connect(probe.get(), AsSockaddr(addr), sizeof(addr)) == 0 || errno == EAGAIN) {
    return Error(ErrorCode::kAlreadyExists,
                 std::string("listen_unix: another process listens on ") + addr.sun_path);
  }
  if (errno == ECONNREFUSED) return OkStatus();
  return PosixError(errno, std::string("listen_unix: probing ") + addr.sun_path);
}

}  // namespace

Result<UniqueFd> ListenUnix(const std::string& path, const UnixListenOptions& options) {
  GM_ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  const mode_t mode = options.mode & 07777;
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Error(ErrorCode::kAlreadyExists,
                   "listen_unix: " + path + " exists and is not a socket");
    }
    GM_RETURN_IF_ERROR(CheckNobodyListens(addr));
    if (!options.replace_stale) {
      return Error(ErrorCode::kAlreadyExists,
                   "listen_unix: a stale socket file is at " + path + " and replace_stale is off");
    }
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return PosixError(errno, "listen_unix: removing the stale socket " + path);
    }
  } else if (errno != ENOENT) {
    return PosixError(errno, "listen_unix: lstat " + path);
  }

  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return PosixError(errno, "listen_unix: socket");
  // Linux creates the socket file with the socket inode's mode less the umask. Narrowing that
  // mode first means the file is never more open than asked, without touching the process-wide
  // umask; while an owner or group is still to be set, only the current owner may use it.
  const bool chown_needed = options.owner.has_value() || options.group.has_value();
  if (fchmod(fd.get(), chown_needed ? (mode & 0700) : mode) != 0) {
    return PosixError(errno, "listen_unix: fchmod of the socket before bind");
  }
  if (bind(fd.get(), AsSockaddr(addr), sizeof(addr)) != 0) {
    return PosixError(errno, "listen_unix: bind " + path);
  }
  auto fail_after_bind = [&](const std::string& what) -> Error {
    const int err = errno;
    unlink(path.c_str());
    return PosixError(err, "listen_unix: " + what + " " + path);
  };
  if (chown_needed && lchown(path.c_str(), options.owner.value_or(static_cast<uid_t>(-1)),
                             options.group.value_or(static_cast<gid_t>(-1))) != 0) {
    return fail_after_bind("chown");
  }
  // The umask may have cleared bits the caller wants: set the exact mode (only ever widening).
  if (fchmodat(AT_FDCWD, path.c_str(), mode, AT_SYMLINK_NOFOLLOW) != 0) {
    return fail_after_bind("chmod");
  }
  if (listen(fd.get(), options.backlog) != 0) return fail_after_bind("listen on");
  return fd;
}

Result<UniqueFd> ConnectUnix(const std::string& path) {
  GM_ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return PosixError(errno, "connect_unix: socket");
  if (connect(fd.get(), AsSockaddr(addr), sizeof(addr)) == 0) return fd;
  if (errno != EINTR) return PosixError(errno, "connect_unix: connect " + path);
  // Interrupted: the connection goes on in the background; wait for its outcome.
  pollfd pfd{fd.get(), POLLOUT, 0};
  int rc;
  do {
    rc = poll(&pfd, 1, -1);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return PosixError(errno, "connect_unix: poll " + path);
  int err = 0;
  socklen_t len = sizeof(err);
  if (getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
  if (err != 0) return PosixError(err, "connect_unix: connect " + path);
  return fd;
}

Result<PeerCredentials> GetPeerCredentials(int socket_fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(socket_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return PosixError(errno,
                      "get_peer_credentials: SO_PEERCRED on fd " + std::to_string(socket_fd));
  }
  PeerCredentials peer{cred.pid, cred.uid, cred.gid, {}};
  // The supplementary groups (Linux 4.13); the kernel says how much room they need.
  std::vector<gid_t> groups(16);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t bytes = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (getsockopt(socket_fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &bytes) == 0) {
      groups.resize(bytes / sizeof(gid_t));
      peer.groups = std::move(groups);
      break;
    }
    if (errno != ERANGE) break;  // ENOPROTOOPT: an older kernel; the primary gid is all
    groups.resize(bytes / sizeof(gid_t) + 1);
  }
  return peer;
}

}  // namespace guestmem
