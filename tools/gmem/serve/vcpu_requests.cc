#include "serve/vcpu_requests.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cassert>
#include <cerrno>
#include <string>

namespace guestmem::cli {
namespace {

constexpr uint64_t kMagic = 0x7371657276706367ULL;  // "gcpvreqs"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kFree = 0;
constexpr uint32_t kRecorded = 1;

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t slots;
  uint64_t reserved[6];
};
static_assert(sizeof(Header) == 64);

}  // namespace

struct VcpuRequestTable::Slot {
  uint32_t state;
  uint32_t channel;
  uint32_t vcpu;
  uint32_t ring_index;
  uint64_t offset;
  uint64_t flags;
  uint64_t gpa;
  uint64_t reserved;
};

namespace {
constexpr size_t kSlotBytes = 48;
}  // namespace

namespace {

constexpr size_t kTableBytes = sizeof(Header) + VcpuRequestTable::kSlots * kSlotBytes;

std::atomic_ref<uint32_t> State(uint32_t& state) { return std::atomic_ref<uint32_t>(state); }

}  // namespace

VcpuRequestTable::VcpuRequestTable(UniqueFd memfd, Mapping mapping)
    : memfd_(std::move(memfd)), mapping_(std::move(mapping)), requests_(kSlots) {}

VcpuRequestTable::Slot* VcpuRequestTable::slots() const {
  static_assert(sizeof(Slot) == kSlotBytes);
  return reinterpret_cast<Slot*>(mapping_.bytes() + sizeof(Header));
}

Result<std::unique_ptr<VcpuRequestTable>> VcpuRequestTable::Create() {
  UniqueFd memfd(memfd_create("gmem-vcpu-requests", MFD_CLOEXEC));
  if (!memfd) return PosixError(errno, "vCPU request table: memfd_create");
  if (ftruncate(memfd.get(), static_cast<off_t>(kTableBytes)) != 0) {
    return PosixError(errno, "vCPU request table: ftruncate");
  }
  GM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::Map(kTableBytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                    memfd.get(), 0));
  auto* header = static_cast<Header*>(mapping.data());
  header->version = kVersion;
  header->slots = kSlots;
  header->magic = kMagic;
  std::unique_ptr<VcpuRequestTable> table(
      new VcpuRequestTable(std::move(memfd), std::move(mapping)));
  for (uint32_t s = kSlots; s > 0; --s) table->free_.push_back(s - 1);
  return table;
}

Result<std::unique_ptr<VcpuRequestTable>> VcpuRequestTable::Attach(UniqueFd memfd) {
  struct stat st {};
  if (fstat(memfd.get(), &st) != 0) return PosixError(errno, "vCPU request table: fstat");
  if (static_cast<uint64_t>(st.st_size) != kTableBytes) {
    return Error(ErrorCode::kProtocolError, "vCPU request table: " + std::to_string(st.st_size) +
                                                " bytes, not " + std::to_string(kTableBytes));
  }
  GM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::Map(kTableBytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                    memfd.get(), 0));
  const auto* header = static_cast<const Header*>(mapping.data());
  if (header->magic != kMagic || header->version != kVersion || header->slots != kSlots) {
    return Error(ErrorCode::kProtocolError, "vCPU request table: not a table this daemon writes");
  }
  std::unique_ptr<VcpuRequestTable> table(
      new VcpuRequestTable(std::move(memfd), std::move(mapping)));
  for (uint32_t s = kSlots; s > 0; --s) {
    Slot& slot = table->slots()[s - 1];
    if (State(slot.state).load(std::memory_order_acquire) != kRecorded) {
      slot.state = kFree;  // anything else is no record
      table->free_.push_back(s - 1);
      continue;
    }
    VcpuRequest& r = table->requests_[s - 1];
    const auto channel = static_cast<VcpuChannel>(slot.channel);
    if (channel != VcpuChannel::kUffdSocket && channel != VcpuChannel::kApfSocket &&
        channel != VcpuChannel::kExitlessRing) {
      State(slot.state).store(kFree, std::memory_order_relaxed);
      table->free_.push_back(s - 1);
      continue;
    }
    r = VcpuRequest{channel, slot.vcpu, slot.ring_index, slot.offset, slot.flags, slot.gpa};
  }
  return table;
}

std::optional<uint32_t> VcpuRequestTable::Record(const VcpuRequest& request) {
  if (free_.empty()) return std::nullopt;
  const uint32_t s = free_.back();
  free_.pop_back();
  Slot& slot = slots()[s];
  slot.channel = static_cast<uint32_t>(request.channel);
  slot.vcpu = request.vcpu;
  slot.ring_index = request.ring_index;
  slot.offset = request.offset;
  slot.flags = request.flags;
  slot.gpa = request.gpa;
  State(slot.state).store(kRecorded, std::memory_order_release);
  requests_[s] = request;
  return s;
}

const VcpuRequest& VcpuRequestTable::at(uint32_t slot) const {
  assert(slot < kSlots);
  return requests_[slot];
}

void VcpuRequestTable::Release(uint32_t s) {
  assert(s < kSlots);
  State(slots()[s].state).store(kFree, std::memory_order_release);
  free_.push_back(s);
}

std::vector<uint32_t> VcpuRequestTable::Recorded() const {
  std::vector<uint32_t> out;
  for (uint32_t s = 0; s < kSlots; ++s) {
    if (State(slots()[s].state).load(std::memory_order_relaxed) == kRecorded) out.push_back(s);
  }
  return out;
}

}  // namespace guestmem::cli
