// Test snapshots: deterministic snapshot files with holes, and page-by-page verification of guest
// memory against them.
//
// Thread safety: CheckPage may be called from many threads; the rest belongs to one test.
#ifndef GUESTMEM_TESTUTIL_SNAPSHOT_FILE_H_
#define GUESTMEM_TESTUTIL_SNAPSHOT_FILE_H_

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/address.h"

namespace guestmem::testutil {

// The byte at `offset` of page `page` of a test snapshot: differs per page and per position.
inline uint8_t SnapshotByte(uint64_t page, uint64_t offset) {
  return static_cast<uint8_t>((page * 131 + offset * 7 + (offset >> 8)) ^ 0x5a);
}

inline void FillSnapshotPage(uint64_t page, uint8_t* out) {
  for (uint64_t i = 0; i < kPageSize4K; ++i) out[i] = SnapshotByte(page, i);
}

// A snapshot file in a fresh temp dir: `pages` pages of 4 KiB, with the pages for which
// is_hole(page) is true left as sparse holes. Removed with the object.
class SnapshotFile {
 public:
  template <typename IsHole>
  SnapshotFile(uint64_t pages, IsHole is_hole) : pages_(pages), path_(dir_.File("snapshot.mem")) {
    const int fd = open(path_.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(pages * kPageSize4K)) != 0) abort();
    std::vector<uint8_t> page(kPageSize4K);
    for (uint64_t p = 0; p < pages; ++p) {
      hole_.push_back(is_hole(p));
      if (hole_.back()) continue;
      FillSnapshotPage(p, page.data());
      if (pwrite(fd, page.data(), kPageSize4K, static_cast<off_t>(p * kPageSize4K)) !=
          static_cast<ssize_t>(kPageSize4K)) {
        abort();
      }
    }
    close(fd);
  }
  explicit SnapshotFile(uint64_t pages) : SnapshotFile(pages, [](uint64_t) { return false; }) {}

  const std::string& path() const { return path_; }
  uint64_t pages() const { return pages_; }
  uint64_t size() const { return pages_ * kPageSize4K; }
  bool hole(uint64_t page) const { return hole_[page]; }

  // Empty if page `page` of the file reads correctly at `data`; else the first mismatch.
  std::string CheckPage(uint64_t page, const uint8_t* data) const {
    for (uint64_t i = 0; i < kPageSize4K; ++i) {
      const uint8_t want = hole_[page] ? 0 : SnapshotByte(page, i);
      if (data[i] != want) {
        return "page " + std::to_string(page) + " byte " + std::to_string(i) + ": got " +
               std::to_string(data[i]) + ", want " + std::to_string(want);
      }
    }
    return "";
  }

 private:
  uint64_t pages_;
  TempDir dir_;
  std::string path_;
  std::vector<bool> hole_;
};

inline bool AllZero(const uint8_t* data, uint64_t length) {
  for (uint64_t i = 0; i < length; ++i) {
    if (data[i] != 0) return false;
  }
  return true;
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_SNAPSHOT_FILE_H_
