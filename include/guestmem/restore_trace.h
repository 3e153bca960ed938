// RestoreTrace: what one VM's restore did, page by page and in time — each install (which pages,
// why: a fault, the prefetch or the fill; how: copy, zero page, continue, populate) and each
// fault's service latency — written compactly to a file for `gmem report` to draw.
//
// The file ("restore trace", .gmtrace):
//   magic "GMTRACE1" (8 bytes), u32 little-endian length N, N bytes of JSON header
//   ({"vm", "pid", "snapshot", "pages": the memory file's size in 4 KiB pages,
//     "started_unix_ns"}), then records of 24 bytes each, little-endian:
//   u64 time_ns (since the trace started), u64 page (first 4 KiB page, by file offset / 4096),
//   u32 value (an install: its page count; a fault: its service latency in ns, saturated),
//   u8 type (TraceRecordType), u8 way (TraceWay; 0 for a fault), u16 zero.
//
// A writer buffers records and writes them in blocks; what is buffered is written by Flush() and
// by the destructor. A write that fails stops the trace (logged once), never the VM.
//
// Thread safety: a writer from one thread at a time (the VM's worker); ReadRestoreTrace anywhere.
#ifndef GUESTMEM_RESTORE_TRACE_H_
#define GUESTMEM_RESTORE_TRACE_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

enum class TraceRecordType : uint8_t {
  kFault = 0,            // a uffd fault served: page = the faulting page, value = latency (ns)
  kFaultInstall = 1,     // pages installed for a fault (its window)
  kPrefetchInstall = 2,  // pages of the learned working set installed ahead of faults
  kFillInstall = 3,      // pages installed by fault-all's background fill
};
inline constexpr uint8_t kTraceRecordTypes = 4;

enum class TraceWay : uint8_t { kCopy = 0, kZero = 1, kContinue = 2, kPopulate = 3 };
inline constexpr uint8_t kTraceWays = 4;

struct TraceRecord {
  uint64_t time_ns = 0;
  uint64_t page = 0;
  uint32_t value = 0;
  TraceRecordType type = TraceRecordType::kFault;
  TraceWay way = TraceWay::kCopy;
};

struct TraceHeader {
  std::string vm;
  pid_t pid = 0;
  std::string snapshot;
  uint64_t pages = 0;
  uint64_t started_unix_ns = 0;
};

inline constexpr size_t kTraceRecordBytes = 24;
// The longest header a reader accepts.
inline constexpr uint32_t kMaxTraceHeaderBytes = 64 * 1024;

class RestoreTraceWriter {
 public:
  // Creates `path` (not replacing a file there) and writes the header.
  // ERRORS: the PosixError of open/write (kAlreadyExists for a file there).
  static Result<std::unique_ptr<RestoreTraceWriter>> Create(const std::string& path,
                                                            TraceHeader header);
  ~RestoreTraceWriter();
  RestoreTraceWriter(const RestoreTraceWriter&) = delete;
  RestoreTraceWriter& operator=(const RestoreTraceWriter&) = delete;

  // Nanoseconds since the trace started (what a record's time_ns is measured in).
  uint64_t Now() const;
  void Append(const TraceRecord& record);
  void Flush();
  const std::string& path() const { return path_; }

 private:
  RestoreTraceWriter(std::string path, UniqueFd fd);
  std::string path_;
  UniqueFd fd_;
  std::chrono::steady_clock::time_point start_;
  std::vector<uint8_t> buffer_;
  bool failed_ = false;
};

struct RestoreTraceData {
  TraceHeader header;
  std::vector<TraceRecord> records;
};

// Reads and checks a whole trace: the magic, a bounded header that is JSON with its fields, whole
// records with known types and ways, pages inside the memory file, times in order.
// ERRORS: kNotFound / the PosixError of reading; kDataLoss naming what is wrong and where.
Result<RestoreTraceData> ReadRestoreTrace(const std::string& path);

}  // namespace guestmem

#endif  // GUESTMEM_RESTORE_TRACE_H_
