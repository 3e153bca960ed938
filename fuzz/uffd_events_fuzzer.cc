// Fuzzes the decoding of userfaultfd events: Userfaultfd::ReadEvents on a real uffd (made with
// Userfaultfd::Create) whose read(2) goes through an Os that returns the fuzz input instead of the
// kernel's messages.
//
// Input: byte 0 chooses how many events ReadEvents may take (1 + byte % 256) and whether the read
// fails instead (byte 1 >= 0xf0: -EAGAIN, -EINTR, -EIO... by its low bits); the rest is what the
// read returns, cut to the size ReadEvents asks for. A fork event carries a descriptor that the
// reader takes over, so, as the kernel would, the Os puts a real one (a duplicate of /dev/null)
// into every whole fork message it returns. Properties checked beyond "no crash, no leak":
//   - on success, one event per whole 32-byte message, in order, each decoded from its message;
//   - on failure nothing is appended;
//   - either way every descriptor the read carried is closed once the events are gone.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <variant>
#include <vector>

#include "fuzz_check.h"
#include "base/open_fds.h"
#include "guestmem/os.h"
#include "guestmem/userfaultfd.h"

namespace guestmem {
namespace {

class ScriptedUffdOs : public OsWrapper {
 public:
  explicit ScriptedUffdOs(int template_fd) : template_fd_(template_fd) {}

  void Start(int uffd, std::span<const uint8_t> bytes, int error) {
    uffd_ = uffd;
    bytes_ = bytes;
    error_ = error;
    returned_.clear();
  }
  // What the last read returned (with the descriptors put into fork messages).
  const std::vector<uint8_t>& returned() const { return returned_; }

  ssize_t Read(int fd, void* buf, size_t count) override {
    if (fd != uffd_) return OsWrapper::Read(fd, buf, count);
    if (error_ != 0) return -error_;
    returned_.assign(bytes_.begin(), bytes_.begin() + std::min(count, bytes_.size()));
    for (size_t at = 0; at + sizeof(uffd_msg) <= returned_.size(); at += sizeof(uffd_msg)) {
      uffd_msg m;
      std::memcpy(&m, returned_.data() + at, sizeof(m));
      if (m.event != UFFD_EVENT_FORK) continue;
      const int child = fcntl(template_fd_, F_DUPFD_CLOEXEC, 0);
      Check(child >= 0, "a descriptor can be duplicated");
      m.arg.fork.ufd = static_cast<__u32>(child);
      std::memcpy(returned_.data() + at, &m, sizeof(m));
    }
    if (!returned_.empty()) std::memcpy(buf, returned_.data(), returned_.size());
    return static_cast<ssize_t>(returned_.size());
  }

 private:
  const int template_fd_;
  int uffd_ = -1;
  std::span<const uint8_t> bytes_;
  int error_ = 0;
  std::vector<uint8_t> returned_;
};

// Checks that `event` is what message `m` says.
void CheckDecoded(const uffd_msg& m, const UffdEvent& event) {
  switch (m.event) {
    case UFFD_EVENT_PAGEFAULT: {
      const auto* fault = std::get_if<PagefaultEvent>(&event);
      Check(fault != nullptr, "a page fault message is a page fault");
      Check(fault->address.value() == m.arg.pagefault.address, "the fault address is kept");
      Check(fault->write == ((m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0),
            "the write flag is kept");
      const PagefaultKind want =
          (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0 ? PagefaultKind::kMinor
          : (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0  ? PagefaultKind::kWriteProtect
                                                                   : PagefaultKind::kMissing;
      Check(fault->kind == want, "the fault kind follows the flags");
      break;
    }
    case UFFD_EVENT_FORK: {
      const auto* fork = std::get_if<ForkEvent>(&event);
      Check(fork != nullptr, "a fork message is a fork");
      Check(fork->child_uffd.get() == static_cast<int>(m.arg.fork.ufd),
            "the fork carries the message's descriptor");
      break;
    }
    case UFFD_EVENT_REMAP: {
      const auto* remap = std::get_if<RemapEvent>(&event);
      Check(remap != nullptr, "a remap message is a remap");
      Check(remap->from.value() == m.arg.remap.from && remap->to.value() == m.arg.remap.to &&
                remap->length == m.arg.remap.len,
            "the remap's range is kept");
      break;
    }
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP: {
      HostVirtAddr start, end;
      if (m.event == UFFD_EVENT_REMOVE) {
        const auto* remove = std::get_if<RemoveEvent>(&event);
        Check(remove != nullptr, "a remove message is a remove");
        start = remove->start;
        end = remove->end;
      } else {
        const auto* unmap = std::get_if<UnmapEvent>(&event);
        Check(unmap != nullptr, "an unmap message is an unmap");
        start = unmap->start;
        end = unmap->end;
      }
      Check(start.value() == m.arg.remove.start && end.value() == m.arg.remove.end,
            "the removed range is kept");
      break;
    }
    default:
      Check(false, "an unknown event type is decoded");
  }
}

struct Fixture {
  Fixture() {
    template_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    Check(template_fd >= 0, "/dev/null opens");
    os = new ScriptedUffdOs(template_fd);
    UffdOptions options;
    options.os = os;
    Result<Userfaultfd> created = Userfaultfd::Create(options);
    if (!created) {
      std::fprintf(stderr, "uffd_events_fuzzer: cannot create a userfaultfd: %s\n",
                   created.error().ToString().c_str());
      std::abort();
    }
    uffd = new Userfaultfd(std::move(*created));
  }
  int template_fd = -1;
  ScriptedUffdOs* os = nullptr;
  Userfaultfd* uffd = nullptr;
};

void FuzzOne(std::span<const uint8_t> input) {
  static Fixture* fixture = new Fixture();
  if (input.size() < 2) return;
  const size_t max_events = 1 + input[0];
  static constexpr int kErrors[] = {EAGAIN, EINTR, EIO, EBADF, EFAULT, EINVAL, ENOMEM, ESRCH};
  const int error = input[1] >= 0xf0 ? kErrors[input[1] & 0x07] : 0;
  const int fds_before = CountOpenFds();
  {
    std::vector<UffdEvent> events(1);  // one already there: ReadEvents appends
    fixture->os->Start(fixture->uffd->fd(), input.subspan(2), error);
    Result<size_t> read = fixture->uffd->ReadEvents(&events, max_events);
    const std::vector<uint8_t>& returned = fixture->os->returned();
    if (read) {
      const size_t whole = returned.size() / sizeof(uffd_msg);
      Check(returned.size() % sizeof(uffd_msg) == 0, "a torn message is an error");
      Check(*read == whole && events.size() == 1 + whole, "one event per message");
      Check(whole <= std::min(max_events, kUffdMaxEventBatch), "no more events than asked for");
      for (size_t i = 0; i < whole; ++i) {
        uffd_msg m;
        std::memcpy(&m, returned.data() + i * sizeof(uffd_msg), sizeof(m));
        CheckDecoded(m, events[1 + i]);
      }
    } else {
      Check(events.size() == 1, "a failed read appends nothing");
    }
  }
  Check(CountOpenFds() == fds_before, "every fork descriptor is closed with its event");
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::FuzzOne(std::span<const uint8_t>(data, size));
  return 0;
}
