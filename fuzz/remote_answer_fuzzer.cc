// Fuzzes what an object store or a web server hands the daemon, and the names a remote pack
// gives: a Content-Range header (body_sink.h), a chunk object (ChunkStore::Decode), and URLs and
// the relative names resolved against them (object_store.h). Beyond "no crash, no leak":
// a Content-Range that parses is a well-formed range and prints back to itself; a chunk object
// that decodes holds exactly its compressed bytes; a URL that parses prints to itself, and what
// it resolves a name to, when it parses, parses to itself.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "fuzz_check.h"
#include "guestmem/chunk_store.h"
#include "guestmem/object_store.h"
#include "remote/body_sink.h"

namespace guestmem {
namespace {

void FuzzContentRange(std::string_view text) {
  const std::optional<ContentRange> range = ContentRange::Parse(text);
  if (!range) return;
  Check(range->first <= range->last, "a range's first byte is not after its last");
  if (range->total) Check(range->last < *range->total, "a range ends inside its object");
  const std::string again = "bytes " + std::to_string(range->first) + "-" +
                            std::to_string(range->last) + "/" +
                            (range->total ? std::to_string(*range->total) : std::string("*"));
  const std::optional<ContentRange> reparsed = ContentRange::Parse(again);
  Check(reparsed && reparsed->first == range->first && reparsed->last == range->last &&
            reparsed->total == range->total,
        "a range prints back to itself");
}

void FuzzChunkObject(std::span<const std::byte> bytes) {
  auto chunk = ChunkStore::Decode(bytes, "fuzzed");
  if (!chunk) {
    Check(chunk.error().code() == ErrorCode::kDataLoss, "a bad chunk object is data loss");
    return;
  }
  Check(chunk->compressed.size() + ChunkStore::kHeaderBytes == bytes.size(),
        "a chunk object holds exactly its compressed bytes");
  Check(ChunkStore::Decode(ChunkStore::Encode(*chunk), "again").has_value(),
        "an encoded chunk decodes");
}

void FuzzUrl(std::string_view text) {
  if (auto url = ObjectUrl::Parse(text)) {
    auto again = ObjectUrl::Parse(url->ToString());
    Check(again && *again == *url, "a URL prints back to itself");
  }
  // The name a remote pack gives its parent or store, resolved against where it lies.
  for (const char* base : {"s3://bucket/dir/pack.gmp", "http://127.0.0.1:8080/a/b/pack.gmp"}) {
    const ObjectUrl resolved = ObjectUrl::Parse(base)->Resolve(text);
    // A name with what no URL may hold resolves to what does not parse (and is refused where a
    // pack gives it); one that parses is the URL it was resolved to.
    auto reparsed = ObjectUrl::Parse(resolved.ToString());
    Check(!reparsed || *reparsed == resolved, "a resolved name that parses is itself");
  }
}

}  // namespace
}  // namespace guestmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  guestmem::FuzzContentRange(text);
  guestmem::FuzzChunkObject(std::as_bytes(std::span(data, size)));
  guestmem::FuzzUrl(text);
  return 0;
}
