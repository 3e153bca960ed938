// Unix-domain stream sockets for the handler daemon and its clients: listening with controlled
// permissions, connecting, and asking who the peer is.
//
// Thread safety: free functions; no shared state (the process umask is not touched).
#ifndef GUESTMEM_UNIX_SOCKET_H_
#define GUESTMEM_UNIX_SOCKET_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

struct UnixListenOptions {
  mode_t mode = 0600;  // permissions of the socket file: owner-only by default
  std::optional<uid_t> owner;
  std::optional<gid_t> group;
  int backlog = 64;
  bool replace_stale = true;  // remove a leftover socket file nobody listens on
};

// Creates, binds and listens (non-blocking, close-on-exec). The socket file is never more open
// than `mode` (the mode is set on the socket before bind, so it holds from the file's creation;
// owner-only until `owner`/`group` are applied), and ends with exactly `mode`. A path that exists
// and is not a socket is refused and left alone (kAlreadyExists), as is a socket somebody listens
// on; a stale socket file nobody listens on is replaced if `replace_stale`, else kAlreadyExists.
// A path longer than sun_path allows is kInvalidArgument naming the limit.
Result<UniqueFd> ListenUnix(const std::string& path, const UnixListenOptions& options = {});

// Connects (the descriptor is blocking and close-on-exec). Nobody there: kNotFound (no file)
// or the PosixError of ECONNREFUSED.
Result<UniqueFd> ConnectUnix(const std::string& path);

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups; empty where SO_PEERGROUPS is missing
};

// SO_PEERCRED (and SO_PEERGROUPS): who is on the other end of a connected socket, as of when it
// connected.
Result<PeerCredentials> GetPeerCredentials(int socket_fd);

}  // namespace guestmem

#endif  // GUESTMEM_UNIX_SOCKET_H_
