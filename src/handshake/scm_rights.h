// The control data of a sendmsg that passes descriptors (one SCM_RIGHTS message), shared by the
// senders of Firecracker's handshake (message 1) and of message 2.
//
// Thread safety: a pure function.
#ifndef GUESTMEM_SRC_HANDSHAKE_SCM_RIGHTS_H_
#define GUESTMEM_SRC_HANDSHAKE_SCM_RIGHTS_H_

#include <sys/socket.h>

#include <cstring>
#include <span>
#include <vector>

namespace guestmem {

// The msg_control bytes that carry `fds`, in order; empty when there are none.
inline std::vector<char> ScmRightsControl(std::span<const int> fds) {
  std::vector<char> control;
  if (fds.empty()) return control;
  control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
  msghdr msg{};
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  return control;
}

}  // namespace guestmem

#endif  // GUESTMEM_SRC_HANDSHAKE_SCM_RIGHTS_H_
