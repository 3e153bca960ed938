// SendRaw: one sendmsg of bytes with descriptors attached, exactly as the test asks — for tests
// that play a peer of the handshake's or message 2's receiver, well formed or not.
//
// Thread safety: a free function.
#ifndef GUESTMEM_TESTUTIL_SEND_RAW_H_
#define GUESTMEM_TESTUTIL_SEND_RAW_H_

#include <sys/socket.h>

#include <span>
#include <string_view>
#include <vector>

#include "handshake/scm_rights.h"

namespace guestmem::testutil {

// Writes `bytes` with a raw sendmsg, `fds` attached; returns what sendmsg returned.
inline ssize_t SendRaw(int sock, std::string_view bytes, std::span<const int> fds = {}) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  std::vector<char> control = ScmRightsControl(fds);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!control.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
  }
  return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_SEND_RAW_H_
