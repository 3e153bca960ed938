// Hex: "0x1f000", the one form every address, offset and size takes in guestmem's messages.
//
// Thread safety: a pure function.
#ifndef GUESTMEM_BASE_HEX_H_
#define GUESTMEM_BASE_HEX_H_

#include <charconv>
#include <cstdint>
#include <string>

namespace guestmem {

inline std::string Hex(uint64_t value) {
  char buf[2 + 16] = {'0', 'x'};
  const auto [end, ec] = std::to_chars(buf + 2, buf + sizeof(buf), value, 16);
  return std::string(buf, end);
}

}  // namespace guestmem

#endif  // GUESTMEM_BASE_HEX_H_
