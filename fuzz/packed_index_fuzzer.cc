// Fuzzes the packed-snapshot parser (packed_index.h, docs/snapshot-format.md): a header and an
// index from hostile bytes. The input is a header followed by an index; the target seals the
// index with its checksum (and the header with its own) so that the parser's structural checks are
// what the fuzzer explores. Beyond "no crash, no leak, no allocation larger than the input", an
// index that parses must answer lookups consistently and serialize back to the very same bytes.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "base/byte_cursor.h"
#include "fuzz_check.h"
#include "guestmem/packed_index.h"

namespace guestmem {
namespace {

void FuzzOne(std::span<const std::byte> data) {
  if (data.size() < PackIndex::kHeaderBytes) {
    Check(!ParsePackHeader(data, data.size()).has_value(), "a short header is refused");
    return;
  }
  std::vector<std::byte> file(data.begin(), data.end());
  // The index is what follows the header; the header says where it is and how long.
  const uint64_t index_offset = PackIndex::kHeaderBytes;
  const uint64_t index_bytes = file.size() - index_offset;
  auto put64 = [&](size_t at, uint64_t v) {
    for (int i = 0; i < 8; ++i) file[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
  };
  std::memcpy(file.data(), PackIndex::kMagic, 8);
  put64(32, index_offset);
  put64(40, index_bytes);
  put64(48, XXH3_64bits(file.data() + index_offset, index_bytes));
  put64(120, XXH3_64bits(file.data(), 120));
  auto header = ParsePackHeader(file, file.size());
  if (!header) return;
  Check(header->index_offset == index_offset && header->index_bytes == index_bytes,
        "the header says where the index is");
  const auto index_span = std::span(file).subspan(index_offset);
  auto index = ParsePackIndex(*header, index_span);
  if (!index) {
    Check(index.error().code() == ErrorCode::kDataLoss, "a bad index is data loss");
    return;
  }
  const uint64_t pages = index->page_count();
  Check(index->runs.size() <= pages && index->chunks.size() <= index->stored_pages(),
        "counts are bounded by the pages");
  uint64_t covered = 0;
  for (const PageRun& run : index->runs) {
    Check(&index->RunAt(run.first_page) == &run, "a run's first page is in it");
    Check(&index->RunAt(run.end_page() - 1) == &run, "a run's last page is in it");
    if (run.kind == PageKind::kStored) {
      const size_t first = index->ChunkOf(run.stored_first);
      const size_t last = index->ChunkOf(run.stored_first + run.pages - 1);
      Check(first <= last && last < index->chunks.size(), "stored pages are in chunks");
    }
    covered += run.pages;
  }
  Check(covered == pages, "the runs cover the pages");
  for (size_t c = 0; c < index->chunks.size() && c < 64; ++c) {
    uint64_t held = 0;
    for (const PageRun& r : index->PagesOfChunk(c)) held += r.pages;
    Check(held == index->chunks[c].pages, "a chunk's pages are where the runs put them");
  }
  const std::string again = index->SerializeIndex();
  Check(again.size() == index_bytes &&
            std::memcmp(again.data(), index_span.data(), index_bytes) == 0,
        "an index serializes back to its bytes");
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  guestmem::FuzzOne(std::as_bytes(std::span(data, size)));
  return 0;
}
