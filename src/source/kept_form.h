// The binary form of what guestmem keeps on disk per snapshot (zero maps, working sets):
// an 8-byte magic, a 32-bit version, the fields (little-endian), and an xxh3-64 checksum of
// everything before it. KeptReader refuses a form whose magic, version or checksum is wrong, so
// that a torn or corrupt file is found out before any field is trusted.
//
// Thread safety: values owned by one thread.
#ifndef GUESTMEM_SOURCE_KEPT_FORM_H_
#define GUESTMEM_SOURCE_KEPT_FORM_H_

#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "guestmem/result.h"
#include "guestmem/zero_map.h"

namespace guestmem {

class KeptWriter {
 public:
  KeptWriter(const char (&magic)[9], uint32_t version) : out_(magic, 8) {
    Put32(version);
    Put32(0);
  }
  void Put64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void Put32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void PutIdentity(const SnapshotIdentity& id) {
    Put64(id.file.dev);
    Put64(id.file.ino);
    Put64(id.file.size);
    Put64(static_cast<uint64_t>(id.file.mtime_ns));
    Put64(static_cast<uint64_t>(id.file.ctime_ns));
    Put64(id.content_sample);
  }
  // The form, sealed with its checksum.
  std::string Finish() {
    Put64(XXH3_64bits(out_.data(), out_.size()));
    return std::move(out_);
  }

 private:
  std::string out_;
};

class KeptReader {
 public:
  // Checks the magic, the checksum and the version; `what` names the form in errors.
  // ERRORS: kDataLoss (a torn or corrupt form).
  static Result<KeptReader> Open(std::span<const std::byte> bytes, const char (&magic)[9],
                                 uint32_t version, const char* what) {
    auto corrupt = [&](const std::string& why) {
      return Error(ErrorCode::kDataLoss, std::string(what) + ": " + why);
    };
    if (bytes.size() < 8 + 8 + 8 || std::memcmp(bytes.data(), magic, 8) != 0) {
      return corrupt("not one (no magic, or too short)");
    }
    KeptReader sum(bytes.subspan(bytes.size() - 8));
    uint64_t stored = 0;
    sum.Get64(&stored);
    if (XXH3_64bits(bytes.data(), bytes.size() - 8) != stored) {
      return corrupt("checksum mismatch (a torn or corrupt file)");
    }
    KeptReader in(bytes.subspan(8, bytes.size() - 16));
    uint32_t found = 0, reserved = 0;
    in.Get32(&found);
    in.Get32(&reserved);
    if (found != version) return corrupt("version " + std::to_string(found) + " unknown");
    return in;
  }

  bool Get64(uint64_t* v) { return Get(v, 8); }
  bool Get32(uint32_t* v) {
    uint64_t wide = 0;
    if (!Get(&wide, 4)) return false;
    *v = static_cast<uint32_t>(wide);
    return true;
  }
  bool GetIdentity(SnapshotIdentity* id) {
    uint64_t f[6];
    for (uint64_t& v : f) {
      if (!Get64(&v)) return false;
    }
    *id = SnapshotIdentity{.file = {.dev = f[0],
                                    .ino = f[1],
                                    .size = f[2],
                                    .mtime_ns = static_cast<int64_t>(f[3]),
                                    .ctime_ns = static_cast<int64_t>(f[4])},
                           .content_sample = f[5]};
    return true;
  }
  size_t left() const { return bytes_.size() - pos_; }

 private:
  explicit KeptReader(std::span<const std::byte> bytes) : bytes_(bytes) {}
  bool Get(uint64_t* v, size_t width) {
    if (left() < width) return false;
    *v = 0;
    for (size_t i = 0; i < width; ++i) {
      *v |= uint64_t{std::to_integer<uint8_t>(bytes_[pos_ + i])} << (8 * i);
    }
    pos_ += width;
    return true;
  }

  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_SOURCE_KEPT_FORM_H_
