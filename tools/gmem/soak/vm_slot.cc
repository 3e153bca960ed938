#include "soak/vm_slot.h"

namespace guestmem::soak {

const char* VmOpName(VmOp op) {
  switch (op) {
    case VmOp::kIdle:
      return "idle";
    case VmOp::kRead:
      return "read";
    case VmOp::kWrite:
      return "write";
    case VmOp::kBalloon:
      return "balloon";
    case VmOp::kMunmap:
      return "munmap";
    case VmOp::kFork:
      return "fork";
    case VmOp::kCheckCopy:
      return "forked child's check";
    case VmOp::kDone:
      return "done";
  }
  return "?";
}

}  // namespace guestmem::soak
