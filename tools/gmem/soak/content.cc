#include "soak/content.h"

namespace guestmem::soak {

std::string DescribeState(uint32_t state, bool hole) {
  if (state == kSnapshot) return hole ? "zero (a hole in the snapshot)" : "the snapshot's data";
  if (state == kZero) return "zero (ballooned, not written since)";
  return "the VM's own pattern (generation " + std::to_string(state - kFirstGeneration + 1) + ")";
}

}  // namespace guestmem::soak
