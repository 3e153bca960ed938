// Uses the installed headers and library: creates a guest memory file, writes a page, reads
// it back through a mapping.
#include <cstdio>
#include <cstring>

#include "guestmem/guestmem.h"

int main() {
  using namespace guestmem;
  auto file = MemoryFile::Create({.size_bytes = 4 * kPageSize4K});
  if (!file) {
    std::fprintf(stderr, "create: %s\n", file.error().ToString().c_str());
    return 1;
  }
  char page[kPageSize4K];
  std::memset(page, 0x5a, sizeof(page));
  if (auto s = (*file)->Populate(FileOffset(kPageSize4K), std::as_bytes(std::span(page))); !s) {
    std::fprintf(stderr, "populate: %s\n", s.error().ToString().c_str());
    return 1;
  }
  auto mapping = (*file)->Map();
  if (!mapping) {
    std::fprintf(stderr, "map: %s\n", mapping.error().ToString().c_str());
    return 1;
  }
  const unsigned char* bytes = static_cast<const unsigned char*>(mapping->data());
  if (bytes[kPageSize4K] != 0x5a || bytes[0] != 0) {
    std::fprintf(stderr, "content mismatch\n");
    return 1;
  }
  std::printf("consumer ok: page 1 reads back through the mapping\n");
  return 0;
}
