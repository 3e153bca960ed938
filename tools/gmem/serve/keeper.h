// The keeper: a small process that holds what `gmem serve` needs to go on serving its VMs, so
// that a successor daemon can take them over when this one dies, even by SIGKILL.
//
// A page-fault handler that dies freezes every VM it served: Firecracker keeps its uffd, and
// nobody answers. So the daemon gives the keeper a copy of everything a successor needs, per VM:
// the uffd, its end of the VM's connection, the memfd holding the VM's page tracker (which pages
// were served or removed by the balloon), the guest memory file, userfault bitmap, table of
// unanswered vCPU faults, APF socket and exitless APF rings where there are, and a description
// (regions, mode, snapshot, which descriptor is which) of its own making; and the listening
// sockets, so that VMs that connect while no daemon runs wait in their backlogs. A daemon that
// starts finds the keeper at its socket path (or starts one) and takes over whatever it holds.
//
// Ownership: one daemon at a time. The first request on a connection is TakeOver(); while the
// owner's connection is open, another TakeOver() is refused (kFailedPrecondition): two daemons
// never serve one VM. When the owner's connection closes without Release(), the owner is taken
// for dead and everything stays kept for the next one. Release() lets everything go and ends the
// keeper. A kept VM whose connection hangs up (the VMM exited) is let go; a keeper with no owner
// and nothing kept exits.
//
// Wire format (a Unix stream socket, owner-only): each message is a 4-byte little-endian length
// and that many bytes of JSON, with its descriptors (SCM_RIGHTS) on the message's first byte.
// Only processes of the keeper's own user (or root) may connect.
//
// Thread safety: a KeeperClient is used by one thread at a time. RunKeeper runs in its own
// process (`gmem keeper PATH`), single-threaded.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_KEEPER_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_KEEPER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem::cli {

// One VM as the keeper holds it.
struct KeptVm {
  uint64_t id = 0;
  std::string description;    // the daemon's own JSON, kept as is
  std::vector<UniqueFd> fds;  // in the order the daemon gave them
};

// What a successor takes over.
struct Inheritance {
  std::vector<KeptVm> vms;
  UniqueFd listener;      // the listening socket, if one was kept
  UniqueFd apf_listener;  // the APF socket's, if one was kept
};

// The most descriptors one VM may be kept with (the kernel's SCM_MAX_FD).
inline constexpr size_t kMaxKeptFds = 253;

enum class ListenerRole { kUffd, kApf };

class KeeperClient {
 public:
  // Connects to the keeper listening at `path`; when nobody listens there, starts one
  // (`program keeper PATH`, by default this very program), waits until it listens, and connects.
  static Result<std::unique_ptr<KeeperClient>> Open(const std::string& path,
                                                    const std::string& program = "/proc/self/exe");

  // Becomes the keeper's owner and takes what it holds (nothing, from a new keeper).
  // ERRORS: kFailedPrecondition while another daemon owns the keeper.
  Result<Inheritance> TakeOver();
  // Keeps (a copy of) a listening socket: the Uffd socket's or the APF socket's.
  Status KeepListener(int listener_fd, ListenerRole role = ListenerRole::kUffd);
  // Keeps (copies of) `fds` for VM `id`; `watch` is the index in `fds` of the VM's connection,
  // whose hang-up means the VM is gone. Replaces what was kept for `id` before. At most
  // kMaxKeptFds descriptors.
  Status Keep(uint64_t id, std::string_view description, std::span<const int> fds, size_t watch);
  Status Forget(uint64_t id);
  // This daemon stops for good: the keeper lets everything go and exits.
  Status Release();

  const std::string& path() const { return path_; }

 private:
  KeeperClient(std::string path, UniqueFd socket)
      : path_(std::move(path)), socket_(std::move(socket)) {}
  // Sends a request and reads the reply's status.
  Status Call(std::string_view json, std::span<const int> fds);

  std::string path_;
  UniqueFd socket_;
};

// The keeper process's main loop: listens at `path` until there is no owner and nothing kept.
Status RunKeeper(const std::string& path);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_KEEPER_H_
