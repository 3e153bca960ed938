// Fuzzes the handler's receive path, ReceiveHandshake, with the peer played by the fuzz input.
//
// Every recvmsg(2) goes through an Os whose Recvmsg answers from the input, so the input chooses
// the message boundaries, the descriptors attached to each part and how the kernel would report
// them, and errors in between. The input is a sequence of records, each a header byte followed by
// what it asks for:
//   header & 0x07: what the call returns
//       0-3  data: the next byte is a length L (0 means "everything left"), then L bytes
//       4    end of file (0)
//       5    -EAGAIN           6  -EINTR           7  -EIO
//   header & 0x18 >> 3: descriptors on a data part: none, one, three, or twenty (more than the
//       receiver offers room for: the part is cut as the kernel cuts it, MSG_CTRUNC)
//   header & 0x20: the control message is SCM_CREDENTIALS instead of SCM_RIGHTS
// When the input runs out the peer hangs up. Descriptors are real (duplicates of /dev/null), so a
// leaked one is seen: after each input the process must hold exactly the descriptors it held
// before. The socket the receiver polls is one end of a socketpair with a byte always waiting.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "fuzz_check.h"
#include "base/open_fds.h"
#include "guestmem/handshake.h"
#include "guestmem/os.h"

namespace guestmem {
namespace {

// The peer, played from the fuzz input.
class ScriptedPeerOs : public OsWrapper {
 public:
  ScriptedPeerOs(int socket_fd, int template_fd)
      : socket_fd_(socket_fd), template_fd_(template_fd) {}

  void Start(std::span<const uint8_t> script) {
    script_ = script;
    at_ = 0;
  }

  ssize_t Recvmsg(int fd, msghdr* msg, int flags) override {
    if (fd != socket_fd_) return OsWrapper::Recvmsg(fd, msg, flags);
    msg->msg_flags = 0;
    const size_t control_room = msg->msg_controllen;
    msg->msg_controllen = 0;
    if (at_ >= script_.size()) return 0;  // the peer hung up
    const uint8_t header = script_[at_++];
    switch (header & 0x07) {
      case 4:
        return 0;
      case 5:
        return -EAGAIN;
      case 6:
        return -EINTR;
      case 7:
        return -EIO;
      default:
        break;
    }
    size_t length = script_.size() - at_;
    if (at_ < script_.size()) {
      const size_t asked = script_[at_++];
      length = asked == 0 ? script_.size() - at_ : std::min<size_t>(asked, script_.size() - at_);
    }
    size_t copied = 0;
    for (size_t i = 0; i < msg->msg_iovlen && copied < length; ++i) {
      const size_t n = std::min(length - copied, msg->msg_iov[i].iov_len);
      std::memcpy(msg->msg_iov[i].iov_base, script_.data() + at_ + copied, n);
      copied += n;
    }
    at_ += length;  // a stream socket keeps the rest; this peer drops it, like a short message
    static constexpr size_t kFdCounts[] = {0, 1, 3, 20};
    const size_t fds = kFdCounts[(header >> 3) & 0x03];
    if (fds > 0) Attach(msg, control_room, fds, (header & 0x20) != 0);
    return static_cast<ssize_t>(copied);
  }

 private:
  // Builds the control message the kernel would: as many descriptors as fit, MSG_CTRUNC if some
  // did not (the kernel closes those; here they are never opened).
  void Attach(msghdr* msg, size_t room, size_t fds, bool credentials) {
    if (msg->msg_control == nullptr || room < CMSG_SPACE(sizeof(int))) {
      msg->msg_flags |= MSG_CTRUNC;
      return;
    }
    std::memset(msg->msg_control, 0, room);
    auto* cmsg = static_cast<cmsghdr*>(msg->msg_control);
    cmsg->cmsg_level = SOL_SOCKET;
    if (credentials) {
      if (room < CMSG_SPACE(sizeof(ucred))) {
        msg->msg_flags |= MSG_CTRUNC;
        return;
      }
      cmsg->cmsg_type = SCM_CREDENTIALS;
      cmsg->cmsg_len = CMSG_LEN(sizeof(ucred));
      const ucred cred{getpid(), getuid(), getgid()};
      std::memcpy(CMSG_DATA(cmsg), &cred, sizeof(cred));
      msg->msg_controllen = CMSG_SPACE(sizeof(ucred));
      return;
    }
    const size_t fit = std::min(fds, (room - CMSG_LEN(0)) / sizeof(int));
    if (fit < fds) msg->msg_flags |= MSG_CTRUNC;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fit * sizeof(int));
    for (size_t i = 0; i < fit; ++i) {
      const int fd = fcntl(template_fd_, F_DUPFD_CLOEXEC, 0);
      Check(fd >= 0, "a descriptor can be duplicated");
      std::memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &fd, sizeof(int));
    }
    msg->msg_controllen = CMSG_SPACE(fit * sizeof(int));
  }

  const int socket_fd_;
  const int template_fd_;
  std::span<const uint8_t> script_;
  size_t at_ = 0;
};

struct Fixture {
  Fixture() {
    int sv[2];
    Check(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    handler = sv[0];
    peer = sv[1];
    // Never read (Recvmsg is the script's), so poll always finds the socket readable.
    Check(write(peer, "x", 1) == 1, "a byte waits on the socket");
    template_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    Check(template_fd >= 0, "/dev/null opens");
    os = new ScriptedPeerOs(handler, template_fd);
  }
  int handler = -1;
  int peer = -1;
  int template_fd = -1;
  ScriptedPeerOs* os = nullptr;
};

void FuzzOne(std::span<const uint8_t> script) {
  static Fixture* fixture = new Fixture();
  const int fds_before = CountOpenFds();
  fixture->os->Start(script);
  {
    Result<ReceivedHandshake> got =
        ReceiveHandshake(fixture->handler, std::chrono::seconds(5), 3, fixture->os);
    if (got) {
      Check(!got->regions.empty(), "a received handshake has regions");
      Check(!got->fds.empty() && got->fds.size() <= 3, "between one and max_fds descriptors");
      Check(ParseHandshake(got->raw_json).has_value(), "the raw JSON parses by itself");
    } else {
      const ErrorCode code = got.error().code();
      Check(code == ErrorCode::kProtocolError || code == ErrorCode::kPeerGone ||
                code == ErrorCode::kIoError,
            "a failed receive is a protocol error, a hang-up or the recvmsg error");
    }
  }
  Check(CountOpenFds() == fds_before, "every received descriptor is closed or handed over");
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::FuzzOne(std::span<const uint8_t>(data, size));
  return 0;
}
