// Chunk codecs and chunk hashes of packed snapshots (packed_index.h).
//
// A chunk is compressed whole with one codec (zstd or lz4, from Debian's libzstd and liblz4) or
// kept as it is; its hash is XXH3-128 of its uncompressed content, which both checks it when it is
// read back and names it in a content-addressed store (chunk_store.h).
//
// Thread safety: the functions are safe from many threads at once.
#ifndef GUESTMEM_CHUNK_CODEC_H_
#define GUESTMEM_CHUNK_CODEC_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {

enum class Codec : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };

std::string_view CodecName(Codec codec);
// "none", "lz4", "zstd"; nullopt for anything else.
std::optional<Codec> ParseCodec(std::string_view name);

// The largest compressed form of `raw_bytes` bytes with `codec` (what a reader may accept).
uint64_t CompressBound(Codec codec, uint64_t raw_bytes);

// Compresses `raw` with `codec` at `level` (zstd: 1..19; lz4: 1 fast, > 1 high compression;
// ignored for kNone) into `out` (resized). Returns the codec the chunk ends up with: kNone where
// compressing would not make it smaller.
Codec CompressChunk(Codec codec, int level, std::span<const std::byte> raw,
                    std::vector<std::byte>* out);

// Decompresses `compressed` into `out`, which it must fill exactly.
// ERRORS: kDataLoss when the data is not a valid frame of `codec` or does not decode to exactly
// out.size() bytes.
Status DecompressChunk(Codec codec, std::span<const std::byte> compressed,
                       std::span<std::byte> out);

// XXH3-128 of a chunk's uncompressed content, in its canonical (big-endian) byte order.
using ChunkHash = std::array<uint8_t, 16>;
ChunkHash HashChunk(std::span<const std::byte> content);
// For unordered containers keyed by chunk hash: its first 8 bytes (already uniformly spread).
struct ChunkHashHasher {
  size_t operator()(const ChunkHash& h) const {
    size_t v = 0;
    for (size_t i = 0; i < sizeof(v); ++i) v = (v << 8) | h[i];
    return v;
  }
};
std::string ToHex(const ChunkHash& hash);
// The hash ToHex wrote (32 lower-case hex digits), or nullopt.
std::optional<ChunkHash> ChunkHashFromHex(std::string_view hex);

}  // namespace guestmem

#endif  // GUESTMEM_CHUNK_CODEC_H_
