// ZeroMap: which 4 KiB pages of a snapshot hold only zeros — by their content, not only holes.
//
// A real guest's memory file has its free memory written as zeros (Firecracker writes every
// page), so knowing only its holes, a handler would read and copy every zero page as data. A
// ZeroMap is found once per snapshot by reading it through (holes are zero without reading), and
// lets a restore install zero pages with UFFDIO_ZEROPAGE (or mapping nothing at all), never
// reading or copying one.
//
// Finding it costs one read of the file; SnapshotCache (snapshot_cache.h) keeps it on disk, keyed
// by the snapshot's identity, so that a snapshot is scanned once, not once per daemon start.
//
// The scan reads with pread (never through a mapping), so a file truncated meanwhile is an error,
// not a SIGBUS.
//
// Thread safety: immutable after Scan/Parse; safe from many threads.
#ifndef GUESTMEM_ZERO_MAP_H_
#define GUESTMEM_ZERO_MAP_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "guestmem/page_source.h"
#include "guestmem/result.h"

namespace guestmem {

// What a cached zero map (or anything else kept per snapshot) belongs to: the file's identity and
// a hash of a sample of its content, so that a file rewritten in place with its time stamps kept
// is still told apart.
struct SnapshotIdentity {
  FileIdentity file;
  uint64_t content_sample = 0;
  bool operator==(const SnapshotIdentity&) const = default;
};

// Reads a sample of the file's content (its first and last pages and pages spread between) and
// returns its identity. ERRORS: the source's read errors.
Result<SnapshotIdentity> IdentifySnapshot(const RawFileSource& source);

class ZeroMap {
 public:
  // Reads every data extent of `source` in large chunks and notes the pages that hold only zeros;
  // holes are zero without reading. ERRORS: the source's (kDataLoss for a file shorter than it
  // was when opened, kIoError).
  static Result<std::shared_ptr<const ZeroMap>> Scan(const RawFileSource& source);

  uint64_t page_count() const { return page_count_; }
  uint64_t zero_pages() const { return zero_pages_; }
  // REQUIRES: page < page_count().
  bool IsZero(uint64_t page) const { return ((words_[page / 64] >> (page % 64)) & 1) != 0; }
  // The first page at or after `page` (up to `end`) whose zero-ness differs from `page`'s.
  uint64_t RunEnd(uint64_t page, uint64_t end) const;

  // The binary form kept on disk: little-endian, with a magic, a version, the identity it was
  // made for and a checksum (xxh3-64) of everything before it.
  std::string Serialize(const SnapshotIdentity& identity) const;
  // Parses what Serialize wrote. ERRORS: kDataLoss for a wrong magic, version, length or
  // checksum (a torn or corrupt file); kFailedPrecondition when it was made for another identity
  // (a stale entry).
  static Result<std::shared_ptr<const ZeroMap>> Parse(std::span<const std::byte> bytes,
                                                      const SnapshotIdentity& expected);

 private:
  ZeroMap(uint64_t page_count, std::vector<uint64_t> words);

  uint64_t page_count_;
  uint64_t zero_pages_ = 0;
  std::vector<uint64_t> words_;  // bit set = all-zero page
};

}  // namespace guestmem

#endif  // GUESTMEM_ZERO_MAP_H_
