#include "guestmem/address_registry.h"

#include <iterator>
#include <mutex>
#include <string>
#include <utility>

#include "base/hex.h"
#include "memory/backend.h"

namespace guestmem {

AddressRegistry& AddressRegistry::Global() {
  static AddressRegistry* const kRegistry = new AddressRegistry();  // usable from destructors
  return *kRegistry;
}

Status AddressRegistry::Register(HostVirtAddr start, uint64_t size,
                                 std::shared_ptr<MemoryFile> file, FileOffset file_offset) {
  const std::string range = "[" + Hex(start.value()) + ", +" + Hex(size) + ")";
  if (file == nullptr) {
    return Error(ErrorCode::kInvalidArgument, "register guest memory " + range + ": no file");
  }
  if (size == 0) {
    return Error(ErrorCode::kInvalidArgument, "register guest memory " + range + ": zero size");
  }
  if (!start.CheckedAdd(size)) {
    return Error(ErrorCode::kOutOfRange,
                 "register guest memory " + range + ": the range wraps around the address space");
  }
  if (!file_offset.CheckedAdd(size)) {
    return Error(ErrorCode::kOutOfRange, "register guest memory " + range + ": file offset " +
                                             Hex(file_offset.value()) + " + size overflows");
  }
  const uint64_t end = start.value() + size;
  std::unique_lock lock(mu_);
  // The first range starting at or after `start`, and the one before it, are the only ones that
  // can overlap.
  auto next = ranges_.lower_bound(start.value());
  if (next != ranges_.end() && next->first < end) {
    return Error(ErrorCode::kAlreadyExists, "register guest memory " + range + ": overlaps [" +
                                                Hex(next->first) + ", +" + Hex(next->second.size) +
                                                ")");
  }
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > start.value()) {
      return Error(ErrorCode::kAlreadyExists, "register guest memory " + range + ": overlaps [" +
                                                  Hex(prev->first) + ", +" +
                                                  Hex(prev->second.size) + ")");
    }
  }
  ranges_.emplace_hint(next, start.value(), Entry{size, std::move(file), file_offset});
  return OkStatus();
}

Status AddressRegistry::Unregister(HostVirtAddr start) {
  std::shared_ptr<MemoryFile> file;  // released after the lock: it may be the last reference
  {
    std::unique_lock lock(mu_);
    auto it = ranges_.find(start.value());
    if (it == ranges_.end()) {
      return Error(ErrorCode::kNotFound,
                   "unregister guest memory: no range starts at " + Hex(start.value()));
    }
    file = std::move(it->second.file);
    ranges_.erase(it);
  }
  return OkStatus();
}

std::optional<GuestMemoryLocation> AddressRegistry::Find(HostVirtAddr addr) const {
  std::shared_lock lock(mu_);
  auto it = ranges_.upper_bound(addr.value());
  if (it == ranges_.begin()) return std::nullopt;
  --it;
  const uint64_t delta = addr.value() - it->first;
  if (delta >= it->second.size) return std::nullopt;
  return GuestMemoryLocation{it->second.file, it->second.file_offset.UncheckedAdd(delta),
                             HostVirtAddr(it->first), it->second.size};
}

size_t AddressRegistry::size() const {
  std::shared_lock lock(mu_);
  return ranges_.size();
}

std::optional<GuestMemoryLocation> FindGuestMemory(HostVirtAddr addr) {
  return AddressRegistry::Global().Find(addr);
}

}  // namespace guestmem
