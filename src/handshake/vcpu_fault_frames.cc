#include "guestmem/vcpu_fault_frames.h"

#include <cstring>

#include "base/hex.h"
#include "guestmem/address.h"

namespace guestmem {
namespace {

// bitcode's packing indexes: the width an integer is written in. u128 0, u64 1, u32 2, u16 3, u8 4.
constexpr int kPackingU64 = 1;
constexpr int kPackingU32 = 2;
constexpr int kPackingU8 = 4;

constexpr size_t WidthOf(int packing) { return size_t{16} >> packing; }

constexpr uint64_t MaxOf(int packing) {
  return WidthOf(packing) >= 8 ? UINT64_MAX : (uint64_t{1} << (8 * WidthOf(packing))) - 1;
}

Error Malformed(const char* type, const char* field, const std::string& what) {
  return Error(ErrorCode::kProtocolError, std::string(type) + "." + field + ": " + what);
}

}  // namespace

// Appends the fields of one frame; the header is written last, once the length is known.
class FrameWriter {
 public:
  FrameWriter() { frame_.size_ = kFrameHeaderBytes; }

  void Byte(uint8_t b) { frame_.bytes_[frame_.size_++] = b; }
  void LittleEndian(uint64_t value, size_t width) {
    for (size_t i = 0; i < width; ++i) Byte(static_cast<uint8_t>(value >> (8 * i)));
  }
  // `type_packing`: kPackingU32 or kPackingU64. The smallest width that holds the value.
  void Unsigned(uint64_t value, int type_packing) {
    int packing = kPackingU8;
    while (packing > type_packing && value > MaxOf(packing)) --packing;
    Byte(static_cast<uint8_t>((packing - type_packing) * 2));
    LittleEndian(value, WidthOf(packing));
  }
  void OptionalUnsigned(const std::optional<uint64_t>& value, int type_packing) {
    Byte(value.has_value() ? 1 : 0);
    if (value) Unsigned(*value, type_packing);
  }

  Frame Finish() {
    const auto length = static_cast<uint32_t>(frame_.size_ - kFrameHeaderBytes);
    for (size_t i = 0; i < kFrameHeaderBytes; ++i) {
      frame_.bytes_[i] = static_cast<uint8_t>(length >> (8 * i));
    }
    return frame_;
  }

 private:
  Frame frame_;
};

namespace {

// Reads the fields of one payload, in order.
class PayloadReader {
 public:
  PayloadReader(std::span<const uint8_t> payload, const char* type) : data_(payload), type_(type) {}

  Result<uint8_t> Byte(const char* field) {
    if (pos_ >= data_.size()) return Malformed(type_, field, "the payload ends inside it");
    return data_[pos_++];
  }
  Result<uint64_t> LittleEndian(const char* field, size_t width) {
    if (data_.size() - pos_ < width) {
      return Malformed(type_, field,
                       "the payload ends inside it (" + std::to_string(width) + " bytes needed, " +
                           std::to_string(data_.size() - pos_) + " left)");
    }
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i) value |= uint64_t{data_[pos_ + i]} << (8 * i);
    pos_ += width;
    return value;
  }
  Result<uint64_t> Unsigned(const char* field, int type_packing) {
    GM_ASSIGN_OR_RETURN(const uint8_t header, Byte(field));
    const int packing = (header + 1) / 2 + type_packing;
    if (packing > kPackingU8) {
      return Malformed(type_, field,
                       "integer header " + Hex(header) + " names no width of a " +
                           (type_packing == kPackingU32 ? "u32" : "u64"));
    }
    uint64_t min = 0;
    if (header % 2 == 1) {
      GM_ASSIGN_OR_RETURN(min, LittleEndian(field, WidthOf(type_packing)));
    }
    GM_ASSIGN_OR_RETURN(const uint64_t value, LittleEndian(field, WidthOf(packing)));
    const uint64_t sum = min + value;  // wraps, as bitcode's does
    return type_packing == kPackingU32 ? sum & 0xffffffffu : sum;
  }
  Result<std::optional<uint64_t>> OptionalUnsigned(const char* field, int type_packing) {
    GM_ASSIGN_OR_RETURN(const uint8_t tag, Byte(field));
    if ((tag & 1) == 0) return std::optional<uint64_t>();
    GM_ASSIGN_OR_RETURN(const uint64_t value, Unsigned(field, type_packing));
    return std::optional<uint64_t>(value);
  }
  Result<bool> Bool(const char* field) {
    GM_ASSIGN_OR_RETURN(const uint8_t b, Byte(field));
    return (b & 1) != 0;
  }
  Status End() {
    if (pos_ == data_.size()) return OkStatus();
    return Error(ErrorCode::kProtocolError, std::string(type_) + ": " +
                                                std::to_string(data_.size() - pos_) +
                                                " trailing byte(s) after the last field");
  }

 private:
  std::span<const uint8_t> data_;
  const char* type_;
  size_t pos_ = 0;
};

std::string OptionalHex(const std::optional<uint64_t>& v) { return v ? Hex(*v) : "None"; }

}  // namespace

FaultReply ReplyTo(const FaultRequest& request) {
  return FaultReply{.vcpu = request.vcpu,
                    .offset = request.offset,
                    .len = kPageSize4K,
                    .flags = request.flags,
                    .gpa = request.gpa,
                    .zero = false};
}

Frame EncodeFaultRequest(const FaultRequest& request) {
  FrameWriter w;
  w.Unsigned(request.vcpu, kPackingU32);
  w.Unsigned(request.offset, kPackingU64);
  w.Unsigned(request.flags, kPackingU64);
  w.OptionalUnsigned(request.gpa, kPackingU64);
  return w.Finish();
}

Frame EncodeFaultReply(const FaultReply& reply) {
  FrameWriter w;
  w.OptionalUnsigned(reply.vcpu, kPackingU32);
  w.Unsigned(reply.offset, kPackingU64);
  w.Unsigned(reply.len, kPackingU64);
  w.Unsigned(reply.flags, kPackingU64);
  w.OptionalUnsigned(reply.gpa, kPackingU64);
  w.Byte(reply.zero ? 1 : 0);
  return w.Finish();
}

Result<FaultRequest> DecodeFaultRequest(std::span<const uint8_t> payload) {
  PayloadReader r(payload, "FaultRequest");
  FaultRequest out;
  GM_ASSIGN_OR_RETURN(const uint64_t vcpu, r.Unsigned("vcpu", kPackingU32));
  out.vcpu = static_cast<uint32_t>(vcpu);
  GM_ASSIGN_OR_RETURN(out.offset, r.Unsigned("offset", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.flags, r.Unsigned("flags", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.gpa, r.OptionalUnsigned("gpa", kPackingU64));
  GM_RETURN_IF_ERROR(r.End());
  return out;
}

Result<FaultReply> DecodeFaultReply(std::span<const uint8_t> payload) {
  PayloadReader r(payload, "FaultReply");
  FaultReply out;
  GM_ASSIGN_OR_RETURN(const std::optional<uint64_t> vcpu, r.OptionalUnsigned("vcpu", kPackingU32));
  if (vcpu) out.vcpu = static_cast<uint32_t>(*vcpu);
  GM_ASSIGN_OR_RETURN(out.offset, r.Unsigned("offset", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.len, r.Unsigned("len", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.flags, r.Unsigned("flags", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.gpa, r.OptionalUnsigned("gpa", kPackingU64));
  GM_ASSIGN_OR_RETURN(out.zero, r.Bool("zero"));
  GM_RETURN_IF_ERROR(r.End());
  return out;
}

Result<std::optional<size_t>> FrameSize(std::span<const uint8_t> data, size_t max_payload) {
  if (data.size() < kFrameHeaderBytes) return std::optional<size_t>();
  uint32_t length = 0;
  for (size_t i = 0; i < kFrameHeaderBytes; ++i) length |= uint32_t{data[i]} << (8 * i);
  if (length > max_payload) {
    return Error(ErrorCode::kProtocolError, "a frame announces " + std::to_string(length) +
                                                " payload bytes; at most " +
                                                std::to_string(max_payload) + " can be valid");
  }
  const size_t size = kFrameHeaderBytes + length;
  if (data.size() < size) return std::optional<size_t>();
  return std::optional<size_t>(size);
}

std::string Describe(const FaultRequest& r) {
  return "FaultRequest{vcpu " + std::to_string(r.vcpu) + ", offset " + Hex(r.offset) + ", flags " +
         Hex(r.flags) + ", gpa " + OptionalHex(r.gpa) + "}";
}

std::string Describe(const FaultReply& r) {
  return "FaultReply{vcpu " + (r.vcpu ? std::to_string(*r.vcpu) : std::string("None")) +
         ", offset " + Hex(r.offset) + ", len " + Hex(r.len) + ", flags " + Hex(r.flags) +
         ", gpa " + OptionalHex(r.gpa) + ", zero " + (r.zero ? "true" : "false") + "}";
}

}  // namespace guestmem
