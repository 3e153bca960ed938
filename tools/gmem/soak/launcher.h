// Launcher: forks the soak's VM processes from a process that has no threads.
//
// The soak's driver runs the fault engine's worker threads. A process forked from it would
// inherit whatever locks those threads held at that moment, and could not start threads of its
// own under ThreadSanitizer. So the driver starts the launcher first, while it has one thread;
// the launcher forks each VM on request, reaps it, and reports its pid and exit status back over a
// socket. Each VM leads its own process group (killing the group kills the VM and any child it
// forked), dies with the launcher, and starts with no descriptor but 0, 1 and 2. The launcher is a
// child subreaper, so a VM's own children that outlive it are reaped too, and it dies with the
// driver.
//
// Thread safety: one thread of the driver owns a Launcher.
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_LAUNCHER_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_LAUNCHER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem::soak {

struct SpawnRequest {
  uint32_t index = 0;  // the VM's number in the run
  uint32_t slot = 0;   // its VmSlot
  uint64_t seed = 0;
  uint64_t page_size = 0;
  uint32_t regions = 1;
  uint64_t operations = 0;
};

struct LauncherEvent {
  enum class Kind : uint32_t { kSpawned, kExited };
  Kind kind = Kind::kSpawned;
  uint32_t index = 0;
  pid_t pid = 0;
  int status = 0;  // kExited: the wait status
};

class Launcher {
 public:
  // Runs in each VM process; returns its exit code.
  using VmMain = std::function<int(const SpawnRequest&)>;

  // Forks the launcher. REQUIRES: the calling process has only one thread.
  static Result<std::unique_ptr<Launcher>> Start(VmMain vm_main);
  // Kills every VM still running (and their children) and waits for the launcher to exit.
  ~Launcher();
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Asks for a VM; its pid comes back as a kSpawned event.
  Status Spawn(const SpawnRequest& request);
  // Readable when an event waits.
  int fd() const { return control_.get(); }
  // The next event, or std::nullopt if none is waiting. kPeerGone if the launcher died.
  Result<std::optional<LauncherEvent>> Next();

 private:
  Launcher(UniqueFd control, pid_t pid) : control_(std::move(control)), pid_(pid) {}

  UniqueFd control_;
  pid_t pid_;
};

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_LAUNCHER_H_
