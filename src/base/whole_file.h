// Whole files read and written at once: what guestmem keeps on disk (cache entries, chunks of a
// store, packed snapshots) is written to a temporary file and renamed into place, so a crash
// leaves either the old file or the new one, never a torn one under the final name.
//
// Thread safety: safe from many threads and processes at once (each writer has its own
// temporary file; the last rename wins).
#ifndef GUESTMEM_BASE_WHOLE_FILE_H_
#define GUESTMEM_BASE_WHOLE_FILE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {

// The content of `path`, if it holds at most `max_bytes`.
// ERRORS: kNotFound; kOutOfRange when larger; the PosixError of reading it.
Result<std::vector<std::byte>> ReadWholeFile(const std::string& path,
                                             uint64_t max_bytes = uint64_t{1} << 30);

enum class Durability { kSynced, kUnsynced };

// A temporary name beside `path`, unique to this process and call.
std::string TemporaryPathFor(const std::string& path);

// Writes `bytes` to `path` whole, or leaves what was there. `what` starts error contexts.
Status WriteFileAtomically(const std::string& path, std::span<const std::byte> bytes,
                           Durability durability, const std::string& what);

}  // namespace guestmem

#endif  // GUESTMEM_BASE_WHOLE_FILE_H_
