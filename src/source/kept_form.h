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

#include "base/byte_cursor.h"
#include "guestmem/result.h"
#include "guestmem/zero_map.h"

namespace guestmem {

class KeptWriter {
 public:
  KeptWriter(const char (&magic)[9], uint32_t version) {
    out_.PutBytes(magic, 8);
    Put32(version);
    Put32(0);
  }
  void Put64(uint64_t v) { out_.Put64(v); }
  void Put32(uint32_t v) { out_.Put32(v); }
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
    Put64(XXH3_64bits(out_.bytes().data(), out_.size()));
    return out_.Take();
  }

 private:
  ByteWriter out_;
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

  bool Get64(uint64_t* v) { return in_.Get64(v); }
  bool Get32(uint32_t* v) { return in_.Get32(v); }
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
  size_t left() const { return in_.left(); }

 private:
  explicit KeptReader(std::span<const std::byte> bytes) : in_(bytes) {}

  ByteReader in_;
};

}  // namespace guestmem

#endif  // GUESTMEM_SOURCE_KEPT_FORM_H_
