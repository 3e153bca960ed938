// Fuzzes the vmm-sim access trace parser (tools/gmem/sim/trace.h, docs/trace-format.md). Beyond
// "no crash, no leak", a parsed trace must come back unchanged from FormatTrace and ParseTrace
// (the line numbers then count the canonical form's lines), and every error must name its line.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "fuzz_check.h"
#include "sim/trace.h"

namespace guestmem::sim {
namespace {

void FuzzOne(std::string_view text) {
  Result<std::vector<TraceAccess>> parsed = ParseTrace(text);
  if (!parsed) {
    Check(parsed.error().code() == ErrorCode::kInvalidArgument, "a bad trace is invalid");
    Check(parsed.error().context().rfind("trace line ", 0) == 0, "an error names its line");
    return;
  }
  uint32_t previous_line = 0;
  for (const TraceAccess& access : *parsed) {
    Check(access.line > previous_line, "accesses come in line order");
    previous_line = access.line;
  }
  Result<std::vector<TraceAccess>> again = ParseTrace(FormatTrace(*parsed));
  Check(again.has_value(), "a formatted trace parses");
  Check(again->size() == parsed->size(), "the round trip keeps every access");
  for (size_t i = 0; i < parsed->size(); ++i) {
    const TraceAccess& a = (*parsed)[i];
    const TraceAccess& b = (*again)[i];
    Check(a.offset == b.offset && a.write == b.write, "the round trip keeps every access");
    Check(b.line == i + 1, "the canonical form has one access per line");
  }
}

}  // namespace
}  // namespace guestmem::sim

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::sim::FuzzOne(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
