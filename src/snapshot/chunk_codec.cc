#include "guestmem/chunk_codec.h"

#include <lz4.h>
#include <lz4hc.h>
#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <limits>

namespace guestmem {

std::string_view CodecName(Codec codec) {
  switch (codec) {
    case Codec::kNone:
      return "none";
    case Codec::kLz4:
      return "lz4";
    case Codec::kZstd:
      return "zstd";
  }
  return "unknown";
}

std::optional<Codec> ParseCodec(std::string_view name) {
  for (Codec codec : {Codec::kNone, Codec::kLz4, Codec::kZstd}) {
    if (name == CodecName(codec)) return codec;
  }
  return std::nullopt;
}

uint64_t CompressBound(Codec codec, uint64_t raw_bytes) {
  switch (codec) {
    case Codec::kNone:
      return raw_bytes;
    case Codec::kLz4:
      if (raw_bytes > LZ4_MAX_INPUT_SIZE) return 0;
      return static_cast<uint64_t>(LZ4_compressBound(static_cast<int>(raw_bytes)));
    case Codec::kZstd:
      return ZSTD_compressBound(raw_bytes);
  }
  return 0;
}

namespace {

// One zstd context per thread, reused: creating one per chunk costs more than compressing a
// small chunk.
ZSTD_CCtx* ThreadCompressContext() {
  struct Holder {
    ZSTD_CCtx* ctx = ZSTD_createCCtx();
    ~Holder() { ZSTD_freeCCtx(ctx); }
  };
  thread_local Holder holder;
  return holder.ctx;
}

ZSTD_DCtx* ThreadDecompressContext() {
  struct Holder {
    ZSTD_DCtx* ctx = ZSTD_createDCtx();
    ~Holder() { ZSTD_freeDCtx(ctx); }
  };
  thread_local Holder holder;
  return holder.ctx;
}

}  // namespace

Codec CompressChunk(Codec codec, int level, std::span<const std::byte> raw,
                    std::vector<std::byte>* out) {
  const uint64_t bound = CompressBound(codec, raw.size());
  size_t written = 0;
  if (codec != Codec::kNone && bound != 0) {
    out->resize(bound);
    if (codec == Codec::kZstd) {
      const size_t n = ZSTD_compressCCtx(ThreadCompressContext(), out->data(), out->size(),
                                         raw.data(), raw.size(), std::clamp(level, 1, 19));
      if (!ZSTD_isError(n)) written = n;
    } else {
      const auto* src = reinterpret_cast<const char*>(raw.data());
      auto* dst = reinterpret_cast<char*>(out->data());
      const int in = static_cast<int>(raw.size());
      const int cap = static_cast<int>(out->size());
      const int n = level > 1 ? LZ4_compress_HC(src, dst, in, cap, std::min(level, LZ4HC_CLEVEL_MAX))
                              : LZ4_compress_default(src, dst, in, cap);
      if (n > 0) written = static_cast<size_t>(n);
    }
  }
  if (written == 0 || written >= raw.size()) {
    out->assign(raw.begin(), raw.end());
    return Codec::kNone;
  }
  out->resize(written);
  return codec;
}

Status DecompressChunk(Codec codec, std::span<const std::byte> compressed,
                       std::span<std::byte> out) {
  auto bad = [&](const std::string& why) {
    return Error(ErrorCode::kDataLoss, std::string(CodecName(codec)) + " chunk: " + why);
  };
  switch (codec) {
    case Codec::kNone:
      if (compressed.size() != out.size()) return bad("stored size differs from its page count");
      std::copy(compressed.begin(), compressed.end(), out.begin());
      return OkStatus();
    case Codec::kLz4: {
      if (compressed.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
          out.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
        return bad("too large");
      }
      const int n = LZ4_decompress_safe(reinterpret_cast<const char*>(compressed.data()),
                                        reinterpret_cast<char*>(out.data()),
                                        static_cast<int>(compressed.size()),
                                        static_cast<int>(out.size()));
      if (n < 0) return bad("not a valid lz4 block");
      if (static_cast<size_t>(n) != out.size()) return bad("decodes to fewer bytes than it holds");
      return OkStatus();
    }
    case Codec::kZstd: {
      const size_t n = ZSTD_decompressDCtx(ThreadDecompressContext(), out.data(), out.size(),
                                           compressed.data(), compressed.size());
      if (ZSTD_isError(n)) return bad(std::string("not a valid zstd frame (") +
                                      ZSTD_getErrorName(n) + ")");
      if (n != out.size()) return bad("decodes to fewer bytes than it holds");
      return OkStatus();
    }
  }
  return bad("unknown codec");
}

ChunkHash HashChunk(std::span<const std::byte> content) {
  const XXH128_hash_t h = XXH3_128bits(content.data(), content.size());
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, h);
  ChunkHash out;
  std::copy(std::begin(canonical.digest), std::end(canonical.digest), out.begin());
  return out;
}

std::string ToHex(const ChunkHash& hash) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(hash.size() * 2);
  for (uint8_t b : hash) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

std::optional<ChunkHash> ChunkHashFromHex(std::string_view hex) {
  ChunkHash hash{};
  if (hex.size() != 2 * hash.size()) return std::nullopt;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < hash.size(); ++i) {
    const int high = digit(hex[2 * i]), low = digit(hex[2 * i + 1]);
    if (high < 0 || low < 0) return std::nullopt;
    hash[i] = static_cast<uint8_t>(high << 4 | low);
  }
  return hash;
}

}  // namespace guestmem
