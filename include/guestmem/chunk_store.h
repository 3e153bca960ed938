// ChunkStore: a directory of compressed chunks named by their content (XXH3-128), shared by the
// packed snapshots of one template so that a chunk they have in common is kept once.
//
// A chunk lives in DIR/ab/abcdef… (the hash in hex, under its first two digits) as a 24-byte
// header (magic, codec, sizes) and its compressed bytes. A chunk is written to a temporary file
// and renamed into place, so a crash leaves it whole or absent; a reader still checks every
// chunk against its hash after decompressing it (packed_source.h).
//
// Thread safety: safe from many threads and processes (the last rename of one chunk wins, and
// both wrote the same content).
#ifndef GUESTMEM_CHUNK_STORE_H_
#define GUESTMEM_CHUNK_STORE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "guestmem/chunk_codec.h"
#include "guestmem/result.h"

namespace guestmem {

struct StoredChunk {
  Codec codec = Codec::kNone;
  uint32_t raw_bytes = 0;
  std::vector<std::byte> compressed;
};

class ChunkStore {
 public:
  static constexpr uint64_t kHeaderBytes = 24;
  // The most compressed bytes a chunk of `raw_bytes` may be kept in, by any codec.
  static uint64_t MaxCompressed(uint32_t raw_bytes);

  // Uses `directory`; `create` makes it (and its parents) when missing.
  // ERRORS: kNotFound (missing and not created), the PosixError of mkdir.
  static Result<ChunkStore> Open(const std::string& directory, bool create);

  const std::string& directory() const { return directory_; }
  std::string PathOf(const ChunkHash& hash) const;

  // Keeps a compressed chunk unless the store has it. Returns the codec and size the store
  // holds it in (those of the earlier copy when there was one).
  // ERRORS: the PosixError of writing it.
  struct Kept {
    bool added = false;
    Codec codec = Codec::kNone;
    uint32_t compressed_bytes = 0;
  };
  Result<Kept> Put(const ChunkHash& hash, Codec codec, uint32_t raw_bytes,
                   std::span<const std::byte> compressed) const;

  // Writes a chunk under `hash`, in place of what the store held under it.
  // ERRORS: the PosixError of writing it.
  Status Write(const ChunkHash& hash, const StoredChunk& chunk) const;
  // The bytes of the file a chunk is kept in, and the chunk such a file holds (`name` for
  // messages). ERRORS: kDataLoss for bytes that are not a whole chunk.
  static std::vector<std::byte> Encode(const StoredChunk& chunk);
  // Whether `chunk` decompresses to `raw_bytes` bytes whose hash is `hash`: the chunk its name
  // says.
  static bool IsWhole(const StoredChunk& chunk, const ChunkHash& hash, uint32_t raw_bytes);
  static Result<StoredChunk> Decode(std::span<const std::byte> file, const std::string& name);

  // The chunk named `hash`, if it holds at most `max_compressed` bytes.
  // ERRORS: kNotFound; kDataLoss for a file that is not a whole chunk; kIoError.
  Result<StoredChunk> Get(const ChunkHash& hash, uint64_t max_compressed) const;

 private:
  explicit ChunkStore(std::string directory) : directory_(std::move(directory)) {}
  std::string directory_;
};

}  // namespace guestmem

#endif  // GUESTMEM_CHUNK_STORE_H_
