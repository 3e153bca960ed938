// Trace: a recorded sequence of guest memory accesses, replayed by the vmm-sim trace workload.
//
// The text format (docs/trace-format.md) has one access per line, "r <hex offset>" or
// "w <hex offset>", where the offset is a byte offset into guest memory as laid out in the
// memory file (region after region); the access touches the 4 KiB page holding it. '#' starts a
// comment that runs to the end of the line; blank lines are ignored. Parse errors name the line.
//
// Thread safety: free functions over value types; no shared state.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_TRACE_H_
#define GUESTMEM_TOOLS_GMEM_SIM_TRACE_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {
class Os;
}

namespace guestmem::sim {

struct TraceAccess {
  uint64_t offset = 0;  // byte offset into guest memory (memory-file space)
  bool write = false;
  uint32_t line = 0;  // 1-based line of the trace it came from (0 if not from a file)

  friend bool operator==(const TraceAccess&, const TraceAccess&) = default;
};

// Parses a whole trace. kInvalidArgument naming the line and what is wrong: an access other than
// 'r' or 'w', a missing offset, an offset that is not hexadecimal or does not fit 64 bits,
// trailing text after the offset.
Result<std::vector<TraceAccess>> ParseTrace(std::string_view text);

// Reads and parses the trace file at `path` (kNotFound if it does not exist). Errors are
// prefixed with the path.
Result<std::vector<TraceAccess>> LoadTrace(const std::string& path, Os* os = nullptr);

// The text form of `accesses`, one line each ("r 0x1000"); ParseTrace reads it back.
std::string FormatTrace(std::span<const TraceAccess> accesses);

}  // namespace guestmem::sim

#endif  // GUESTMEM_TOOLS_GMEM_SIM_TRACE_H_
