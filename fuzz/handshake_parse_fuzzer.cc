// Fuzzes the handler's reading of a Firecracker handshake: ParseHandshake on arbitrary bytes, then
// ValidateHandshake of whatever parses against memory files of several sizes. Beyond "no crash,
// no leak, no undefined behaviour", it checks two properties:
//   - a parsed handshake survives EncodeHandshake and ParseHandshake unchanged (the deprecated
//     page_size_kib, absent or equal to page_size, comes back as page_size);
//   - validation is monotonic in the file size: regions valid for a file stay valid for a larger
//     one.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "fuzz_check.h"
#include "guestmem/handshake.h"

namespace guestmem {
namespace {

bool SameRegion(const HandshakeRegion& a, const HandshakeRegion& b) {
  return a.base_host_virt_addr == b.base_host_virt_addr && a.size == b.size &&
         a.offset == b.offset && a.page_size == b.page_size && a.gpa_start == b.gpa_start &&
         a.is_guest_memfd == b.is_guest_memfd;
}

void FuzzOne(std::string_view json) {
  Result<std::vector<HandshakeRegion>> parsed = ParseHandshake(json);
  if (!parsed) {
    Check(parsed.error().code() == ErrorCode::kProtocolError, "a parse error is a protocol error");
    return;
  }
  const std::vector<HandshakeRegion>& regions = *parsed;
  Check(!regions.empty(), "a parsed handshake has regions");
  for (const HandshakeRegion& r : regions) {
    Check(!r.page_size_kib || *r.page_size_kib == r.page_size, "page_size_kib equals page_size");
  }

  Result<std::vector<HandshakeRegion>> again = ParseHandshake(EncodeHandshake(regions));
  Check(again.has_value(), "an encoded handshake parses");
  Check(again->size() == regions.size(), "the round trip keeps every region");
  for (size_t i = 0; i < regions.size(); ++i) {
    Check(SameRegion(regions[i], (*again)[i]), "the round trip keeps every field");
  }

  constexpr uint64_t kFileSizes[] = {0, 4096, uint64_t{1} << 30, uint64_t{1} << 40, UINT64_MAX};
  bool valid_before = false;
  for (uint64_t file_size : kFileSizes) {
    Status valid = ValidateHandshake(regions, file_size);
    if (!valid) {
      Check(valid.error().code() == ErrorCode::kInvalidArgument,
            "a validation error is an invalid argument");
    }
    Check(!valid_before || valid.has_value(), "valid regions stay valid in a larger file");
    valid_before = valid.has_value();
  }
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::FuzzOne(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
