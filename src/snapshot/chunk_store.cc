#include "guestmem/chunk_store.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/byte_cursor.h"
#include "base/whole_file.h"

namespace guestmem {
namespace {

constexpr char kChunkMagic[9] = "GMCHUNK1";

}  // namespace

uint64_t ChunkStore::MaxCompressed(uint32_t raw_bytes) {
  return std::max({CompressBound(Codec::kNone, raw_bytes), CompressBound(Codec::kZstd, raw_bytes),
                   CompressBound(Codec::kLz4, raw_bytes)});
}

Result<ChunkStore> ChunkStore::Open(const std::string& directory, bool create) {
  std::error_code error;
  if (create) {
    std::filesystem::create_directories(directory, error);
    if (error) return PosixError(error.value(), "chunk store: creating " + directory);
  }
  if (!std::filesystem::is_directory(directory, error)) {
    return Error(ErrorCode::kNotFound, "chunk store " + directory + " is not a directory");
  }
  return ChunkStore(directory);
}

std::string ChunkStore::PathOf(const ChunkHash& hash) const {
  const std::string hex = ToHex(hash);
  return directory_ + "/" + hex.substr(0, 2) + "/" + hex;
}

Result<ChunkStore::Kept> ChunkStore::Put(const ChunkHash& hash, Codec codec, uint32_t raw_bytes,
                                         std::span<const std::byte> compressed) const {
  // A chunk already there is kept only if it is whole: a torn or corrupt one is written again.
  if (auto existing = Get(hash, MaxCompressed(raw_bytes));
      existing && IsWhole(*existing, hash, raw_bytes)) {
    return Kept{.added = false,
                .codec = existing->codec,
                .compressed_bytes = static_cast<uint32_t>(existing->compressed.size())};
  }
  StoredChunk chunk{.codec = codec, .raw_bytes = raw_bytes};
  chunk.compressed.assign(compressed.begin(), compressed.end());
  GM_RETURN_IF_ERROR(Write(hash, chunk));
  return Kept{
      .added = true, .codec = codec, .compressed_bytes = static_cast<uint32_t>(compressed.size())};
}

Status ChunkStore::Write(const ChunkHash& hash, const StoredChunk& chunk) const {
  const std::string path = PathOf(hash);
  std::error_code error;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), error);
  if (error) return PosixError(error.value(), "chunk store: creating a directory for " + path);
  const std::vector<std::byte> file = Encode(chunk);
  return WriteFileAtomically(path, file, Durability::kUnsynced, "chunk store");
}

std::vector<std::byte> ChunkStore::Encode(const StoredChunk& chunk) {
  ByteWriter w;
  w.PutBytes(kChunkMagic, 8);
  w.Put8(static_cast<uint8_t>(chunk.codec));
  w.PutZeros(3);
  w.Put32(chunk.raw_bytes);
  w.Put32(static_cast<uint32_t>(chunk.compressed.size()));
  w.PutZeros(4);
  w.PutBytes(chunk.compressed.data(), chunk.compressed.size());
  const auto bytes = std::as_bytes(std::span(w.bytes()));
  return {bytes.begin(), bytes.end()};
}

bool ChunkStore::IsWhole(const StoredChunk& chunk, const ChunkHash& hash, uint32_t raw_bytes) {
  if (chunk.raw_bytes != raw_bytes) return false;
  std::vector<std::byte> content(raw_bytes);
  return DecompressChunk(chunk.codec, chunk.compressed, content) && HashChunk(content) == hash;
}

Result<StoredChunk> ChunkStore::Decode(std::span<const std::byte> file, const std::string& name) {
  ByteReader in(file);
  char magic[8];
  uint8_t codec = 0;
  StoredChunk out;
  uint32_t compressed = 0;
  if (!in.GetBytes(magic, 8) || std::memcmp(magic, kChunkMagic, 8) != 0 || !in.Get8(&codec) ||
      !in.Skip(3) || !in.Get32(&out.raw_bytes) || !in.Get32(&compressed) || !in.Skip(4) ||
      codec > static_cast<uint8_t>(Codec::kZstd) || compressed != in.left()) {
    return Error(ErrorCode::kDataLoss, "chunk store: " + name + " is not a whole chunk");
  }
  out.codec = static_cast<Codec>(codec);
  const auto body = file.subspan(kHeaderBytes);
  out.compressed.assign(body.begin(), body.end());
  return out;
}

Result<StoredChunk> ChunkStore::Get(const ChunkHash& hash, uint64_t max_compressed) const {
  const std::string path = PathOf(hash);
  auto bytes = ReadWholeFile(path, max_compressed + kHeaderBytes);
  if (!bytes) {
    if (bytes.error().code() == ErrorCode::kOutOfRange) {
      return Error(ErrorCode::kDataLoss, "chunk store: " + bytes.error().context());
    }
    return std::move(bytes).error().WithContext("chunk store");
  }
  return Decode(*bytes, path);
}

}  // namespace guestmem
