// VcpuRequestTable: the vCPU faults a daemon has taken from one VM and not answered yet, kept in a
// memfd that the keeper holds, so that a successor answers them when this daemon dies.
//
// A request is recorded before it leaves where it came from: a frame is recorded while it is still
// on the socket (only looked at), then consumed; a ring entry is recorded before the ring's tail
// moves past it. It is released only once its answer is out: the reply's last byte written, or
// the completion pushed. So a daemon killed at any instant leaves every request it took either in
// the table or still in its socket or ring. A request in both (killed between recording and
// consuming) is answered twice: for a vCPU's synchronous fault the second reply is a spurious one,
// which costs that vCPU one more round trip and nothing else; a ring entry in both is told apart by
// its ring index and dropped from the table.
//
// Layout (native byte order, read only by daemons of the same build): a 64-byte header (magic,
// version, slot count), then kSlots slots of 48 bytes: u32 state (0 free, 1 recorded), u32 channel,
// u32 vcpu, u32 ring index, u64 offset, u64 flags, u64 gpa, u64 reserved. A slot's fields are
// written before its state.
//
// Thread safety: one thread (the server loop). The memory is shared with the keeper (which never
// reads it) and with a successor (which attaches only after this daemon is gone).
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_VCPU_REQUESTS_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_VCPU_REQUESTS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem::cli {

// Where a vCPU fault came from, and so where its answer goes.
enum class VcpuChannel : uint32_t {
  kUffdSocket = 1,    // a synchronous fault: a FaultReply on the Uffd socket
  kApfSocket = 2,     // an async fault Firecracker could not make exitless: a reply on the APF
                      // socket
  kExitlessRing = 3,  // an exitless async fault: a completion in the vCPU's ring
};

struct VcpuRequest {
  VcpuChannel channel = VcpuChannel::kUffdSocket;
  uint32_t vcpu = 0;
  uint32_t ring_index = 0;  // kExitlessRing: the notification's free-running index
  uint64_t offset = 0;      // the request's, echoed in the reply
  uint64_t flags = 0;
  uint64_t gpa = 0;
};

class VcpuRequestTable {
 public:
  // Requests one VM may have taken and not answered at once: its bound on what the daemon holds
  // for it (posted faults, buffered replies).
  static constexpr uint32_t kSlots = 512;

  static Result<std::unique_ptr<VcpuRequestTable>> Create();
  // A predecessor's table. ERRORS: kProtocolError for a memfd that is not one (size, magic).
  static Result<std::unique_ptr<VcpuRequestTable>> Attach(UniqueFd memfd);

  int fd() const { return memfd_.get(); }
  size_t used() const { return kSlots - free_.size(); }
  bool full() const { return free_.empty(); }

  // Records `request` in a free slot and returns it; std::nullopt when every slot is taken.
  std::optional<uint32_t> Record(const VcpuRequest& request);
  const VcpuRequest& at(uint32_t slot) const;
  void Release(uint32_t slot);
  // Every recorded slot, in slot order.
  std::vector<uint32_t> Recorded() const;

 private:
  struct Slot;
  VcpuRequestTable(UniqueFd memfd, Mapping mapping);
  Slot* slots() const;

  UniqueFd memfd_;
  Mapping mapping_;
  std::vector<uint32_t> free_;         // a stack: the lowest slot is taken first
  std::vector<VcpuRequest> requests_;  // what each recorded slot holds, for at()
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_VCPU_REQUESTS_H_
