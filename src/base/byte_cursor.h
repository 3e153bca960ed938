// Little-endian fields written to and read from byte strings: the one place the on-disk forms
// (kept_form.h, packed snapshots) encode integers.
//
// Thread safety: values owned by one thread.
#ifndef GUESTMEM_BASE_BYTE_CURSOR_H_
#define GUESTMEM_BASE_BYTE_CURSOR_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

namespace guestmem {

class ByteWriter {
 public:
  ByteWriter() = default;
  explicit ByteWriter(std::string start) : out_(std::move(start)) {}

  void Put64(uint64_t v) { PutLe(v, 8); }
  void Put32(uint32_t v) { PutLe(v, 4); }
  void Put16(uint16_t v) { PutLe(v, 2); }
  void Put8(uint8_t v) { PutLe(v, 1); }
  void PutBytes(const void* data, size_t n) { out_.append(static_cast<const char*>(data), n); }
  void PutZeros(size_t n) { out_.append(n, '\0'); }

  size_t size() const { return out_.size(); }
  std::string& bytes() { return out_; }
  std::string Take() { return std::move(out_); }

 private:
  void PutLe(uint64_t v, int width) {
    for (int i = 0; i < width; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  std::string out_;
};

// Every Get fails (returns false, reads nothing) once fewer bytes are left than it needs.
class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  bool Get64(uint64_t* v) { return GetLe(v, 8); }
  bool Get32(uint32_t* v) { return GetNarrow(v, 4); }
  bool Get16(uint16_t* v) { return GetNarrow(v, 2); }
  bool Get8(uint8_t* v) { return GetNarrow(v, 1); }
  bool GetBytes(void* out, size_t n) {
    if (left() < n) return false;
    std::memcpy(out, bytes_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool Skip(size_t n) {
    if (left() < n) return false;
    pos_ += n;
    return true;
  }

  size_t left() const { return bytes_.size() - pos_; }
  size_t position() const { return pos_; }

 private:
  template <typename T>
  bool GetNarrow(T* v, int width) {
    uint64_t wide = 0;
    if (!GetLe(&wide, width)) return false;
    *v = static_cast<T>(wide);
    return true;
  }
  bool GetLe(uint64_t* v, int width) {
    if (left() < static_cast<size_t>(width)) return false;
    *v = 0;
    for (int i = 0; i < width; ++i) {
      *v |= uint64_t{std::to_integer<uint8_t>(bytes_[pos_ + static_cast<size_t>(i)])} << (8 * i);
    }
    pos_ += static_cast<size_t>(width);
    return true;
  }

  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_BASE_BYTE_CURSOR_H_
