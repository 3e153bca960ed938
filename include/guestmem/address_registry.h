// AddressRegistry: "is this host address guest memory, and where in which file?"
//
// The user-space counterpart of the seed's vma_is_guestmem(): every live MemoryMapping registers
// its address range here (MemoryFile::Map does it; the mapping's destructor undoes it), so code
// that only holds a host virtual address (a fault handler, a VMM's MMIO path) can find the file
// and the offset behind it. AddressRegistry::Global() is the process-wide instance that mappings
// use; separate instances can be made for other address spaces (or tests).
//
// Ranges are kept in an ordered map: Register, Unregister and Find are O(log n).
//
// Thread safety: every method may be called from any thread; lookups run in parallel with each
// other (a shared lock) and never see a half-registered range. A location found is a snapshot:
// the mapping may be destroyed right after Find returns (the returned shared_ptr keeps its file
// alive, not its mapping).
#ifndef GUESTMEM_ADDRESS_REGISTRY_H_
#define GUESTMEM_ADDRESS_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>

#include "guestmem/address.h"
#include "guestmem/result.h"

namespace guestmem {

class MemoryFile;

struct GuestMemoryLocation {
  std::shared_ptr<MemoryFile> file;
  FileOffset offset;           // where the looked-up address is in the file
  HostVirtAddr mapping_start;  // the registered mapping that holds it
  uint64_t mapping_size = 0;
};

class AddressRegistry {
 public:
  AddressRegistry() = default;
  AddressRegistry(const AddressRegistry&) = delete;
  AddressRegistry& operator=(const AddressRegistry&) = delete;

  // The process-wide registry; never destroyed.
  static AddressRegistry& Global();

  // Records that [start, start + size) maps `file` from `file_offset` on. kInvalidArgument for a
  // null file or zero size, kOutOfRange if the range wraps around, kAlreadyExists if it overlaps
  // a registered range (nothing is recorded then).
  Status Register(HostVirtAddr start, uint64_t size, std::shared_ptr<MemoryFile> file,
                  FileOffset file_offset);
  // Forgets the range that starts at `start`; kNotFound if none does.
  Status Unregister(HostVirtAddr start);

  // The registered range holding `addr`, or std::nullopt.
  std::optional<GuestMemoryLocation> Find(HostVirtAddr addr) const;
  // How many ranges are registered.
  size_t size() const;

 private:
  struct Entry {
    uint64_t size;
    std::shared_ptr<MemoryFile> file;
    FileOffset file_offset;
  };

  mutable std::shared_mutex mu_;
  std::map<uint64_t, Entry> ranges_;  // by start address; GUARDED_BY(mu_)
};

// AddressRegistry::Global().Find(addr): the seed's vma_is_guestmem, with the answer's details.
std::optional<GuestMemoryLocation> FindGuestMemory(HostVirtAddr addr);

}  // namespace guestmem

#endif  // GUESTMEM_ADDRESS_REGISTRY_H_
