#include "guestmem/restore_trace.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <utility>

#include "guestmem/log.h"

namespace guestmem {
namespace {

constexpr char kMagic[8] = {'G', 'M', 'T', 'R', 'A', 'C', 'E', '1'};
// Records are written in blocks of this many bytes.
constexpr size_t kBlockBytes = 64 * 1024;

void PutLe(std::vector<uint8_t>& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

uint64_t GetLe(const uint8_t* in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= static_cast<uint64_t>(in[i]) << (8 * i);
  return value;
}

Status WriteAll(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "write");
    data += n;
    size -= static_cast<size_t>(n);
  }
  return OkStatus();
}

Error Corrupt(const std::string& path, const std::string& why) {
  return Error(ErrorCode::kDataLoss, "restore trace " + path + ": " + why);
}

}  // namespace

Result<std::unique_ptr<RestoreTraceWriter>> RestoreTraceWriter::Create(const std::string& path,
                                                                       TraceHeader header) {
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (!fd) return PosixError(errno, "restore trace: creating " + path);
  const std::string json = nlohmann::json{
      {"vm", header.vm},
      {"pid", header.pid},
      {"snapshot", header.snapshot},
      {"pages", header.pages},
      {"started_unix_ns",
       header.started_unix_ns}}.dump();
  std::vector<uint8_t> head(kMagic, kMagic + sizeof(kMagic));
  PutLe(head, json.size(), 4);
  head.insert(head.end(), json.begin(), json.end());
  if (Status written = WriteAll(fd.get(), head.data(), head.size()); !written) {
    return std::move(written).error().WithContext("restore trace " + path);
  }
  return std::unique_ptr<RestoreTraceWriter>(new RestoreTraceWriter(path, std::move(fd)));
}

RestoreTraceWriter::RestoreTraceWriter(std::string path, UniqueFd fd)
    : path_(std::move(path)), fd_(std::move(fd)), start_(std::chrono::steady_clock::now()) {
  buffer_.reserve(kBlockBytes + kTraceRecordBytes);
}

RestoreTraceWriter::~RestoreTraceWriter() { Flush(); }

uint64_t RestoreTraceWriter::Now() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now() - start_)
                                   .count());
}

void RestoreTraceWriter::Append(const TraceRecord& r) {
  if (failed_) return;
  PutLe(buffer_, r.time_ns, 8);
  PutLe(buffer_, r.page, 8);
  PutLe(buffer_, r.value, 4);
  buffer_.push_back(static_cast<uint8_t>(r.type));
  buffer_.push_back(static_cast<uint8_t>(r.way));
  PutLe(buffer_, 0, 2);
  if (buffer_.size() >= kBlockBytes) Flush();
}

void RestoreTraceWriter::Flush() {
  if (failed_ || buffer_.empty()) return;
  if (Status written = WriteAll(fd_.get(), buffer_.data(), buffer_.size()); !written) {
    failed_ = true;
    Log(LogLevel::kWarning, "restore trace " + path_ + " stopped: " + written.error().ToString());
  }
  buffer_.clear();
}

Result<RestoreTraceData> ReadRestoreTrace(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return PosixError(errno, "restore trace: opening " + path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return PosixError(errno, "restore trace: " + path);
  if (!S_ISREG(st.st_mode)) return Corrupt(path, "not a regular file");
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = read(fd.get(), bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "restore trace: reading " + path);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  bytes.resize(got);
  if (bytes.size() < sizeof(kMagic) + 4 || std::memcmp(bytes.data(), kMagic, sizeof(kMagic))) {
    return Corrupt(path, "not a restore trace (no GMTRACE1 magic)");
  }
  const uint64_t header_bytes = GetLe(bytes.data() + sizeof(kMagic), 4);
  if (header_bytes > kMaxTraceHeaderBytes || sizeof(kMagic) + 4 + header_bytes > bytes.size()) {
    return Corrupt(path, "header of " + std::to_string(header_bytes) + " bytes does not fit");
  }
  const size_t records_at = sizeof(kMagic) + 4 + header_bytes;
  const nlohmann::json json = nlohmann::json::parse(
      bytes.begin() + sizeof(kMagic) + 4, bytes.begin() + static_cast<std::ptrdiff_t>(records_at),
      nullptr, /*allow_exceptions=*/false);
  RestoreTraceData out;
  static const nlohmann::json kMissing;
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!json.is_object()) return kMissing;
    auto it = json.find(key);
    return it == json.end() ? kMissing : *it;
  };
  if (!field("vm").is_string() || !field("pid").is_number_unsigned() ||
      field("pid").get<uint64_t>() > INT32_MAX || !field("snapshot").is_string() ||
      !field("pages").is_number_unsigned() || !field("started_unix_ns").is_number_unsigned()) {
    return Corrupt(path, "the header is not the JSON object of a trace");
  }
  out.header = {field("vm").get<std::string>(), static_cast<pid_t>(field("pid").get<uint64_t>()),
                field("snapshot").get<std::string>(), field("pages").get<uint64_t>(),
                field("started_unix_ns").get<uint64_t>()};
  const size_t body = bytes.size() - records_at;
  if (body % kTraceRecordBytes != 0) {
    return Corrupt(path, "its records end in a partial record (" +
                             std::to_string(body % kTraceRecordBytes) + " bytes left over)");
  }
  out.records.reserve(body / kTraceRecordBytes);
  uint64_t last_time = 0;
  for (size_t at = records_at; at < bytes.size(); at += kTraceRecordBytes) {
    const uint8_t* r = bytes.data() + at;
    TraceRecord record;
    record.time_ns = GetLe(r, 8);
    record.page = GetLe(r + 8, 8);
    record.value = static_cast<uint32_t>(GetLe(r + 16, 4));
    const uint8_t type = r[20];
    const uint8_t way = r[21];
    const std::string where = "record " + std::to_string(out.records.size());
    if (type >= kTraceRecordTypes) {
      return Corrupt(path, where + ": unknown type " + std::to_string(type));
    }
    if (way >= kTraceWays) return Corrupt(path, where + ": unknown way " + std::to_string(way));
    record.type = static_cast<TraceRecordType>(type);
    record.way = static_cast<TraceWay>(way);
    const uint64_t count = record.type == TraceRecordType::kFault ? 1 : record.value;
    if (record.page >= out.header.pages || count > out.header.pages - record.page) {
      return Corrupt(path, where + ": pages " + std::to_string(record.page) + "+" +
                               std::to_string(count) + " beyond the memory file's " +
                               std::to_string(out.header.pages));
    }
    if (record.time_ns < last_time) return Corrupt(path, where + ": time goes backwards");
    last_time = record.time_ns;
    out.records.push_back(record);
  }
  return out;
}

}  // namespace guestmem
