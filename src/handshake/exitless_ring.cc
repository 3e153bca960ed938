#include "guestmem/exitless_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>

namespace guestmem {
namespace {

struct Header {
  uint32_t version;
  uint32_t ring_size;
  uint32_t entry_size;
  uint32_t flags;
  uint64_t reserved[6];
};

struct Ring {
  uint32_t head;
  uint32_t pad0[15];
  uint32_t tail;
  uint32_t pad1[15];
  ExitlessEntry entries[kExitlessRingEntries];
};

struct Page {
  Header header;
  Ring notify;
  Ring complete;
};

static_assert(sizeof(Header) == 64);
static_assert(sizeof(ExitlessEntry) == kExitlessEntryBytes);
static_assert(sizeof(Ring) == 1152);
static_assert(offsetof(Page, notify) == kExitlessNotifyOffset);
static_assert(offsetof(Page, complete) == kExitlessCompleteOffset);
static_assert(sizeof(Page) <= kExitlessRingPageBytes);

std::atomic_ref<uint32_t> Atomic(uint32_t& v) { return std::atomic_ref<uint32_t>(v); }

Page& PageOf(const Mapping& m) { return *static_cast<Page*>(m.data()); }

// A file (a memfd standing for the vCPU fd, say) must hold the ring page, and must not be able to
// shrink under the mapping: an access past its end would be a SIGBUS in the process that maps it.
// A KVM vCPU fd is no regular file and needs neither.
Status CheckBacking(int fd, bool require_seal) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return PosixError(errno, "exitless APF ring: fstat of the vCPU fd");
  if (!S_ISREG(st.st_mode)) return OkStatus();
  const uint64_t needed = kExitlessRingPageOffset + kExitlessRingPageBytes;
  if (static_cast<uint64_t>(st.st_size) < needed) {
    return Error(ErrorCode::kProtocolError,
                 "exitless APF ring: the vCPU fd is a file of " + std::to_string(st.st_size) +
                     " bytes; its ring page ends at byte " + std::to_string(needed));
  }
  if (require_seal) {
    const int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      return Error(ErrorCode::kProtocolError,
                   "exitless APF ring: the vCPU fd is a file that may shrink under its mapping "
                   "(not sealed with F_SEAL_SHRINK)");
    }
  }
  return OkStatus();
}

}  // namespace

Result<ExitlessRing> ExitlessRing::Map(int vcpu_fd, Os* os) {
  GM_RETURN_IF_ERROR(CheckBacking(vcpu_fd, /*require_seal=*/true));
  GM_ASSIGN_OR_RETURN(
      Mapping page,
      Mapping::Map(kExitlessRingPageBytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                   static_cast<off_t>(kExitlessRingPageOffset), nullptr, os));
  const Header& h = PageOf(page).header;
  const uint32_t version = Atomic(const_cast<uint32_t&>(h.version)).load(std::memory_order_acquire);
  if (version != kExitlessRingVersion || h.ring_size != kExitlessRingEntries ||
      h.entry_size != kExitlessEntryBytes) {
    return Error(ErrorCode::kProtocolError,
                 "exitless APF ring: header says version " + std::to_string(version) + ", " +
                     std::to_string(h.ring_size) + " entries of " + std::to_string(h.entry_size) +
                     " bytes; version 1, 64 entries of 16 bytes expected");
  }
  return ExitlessRing(std::move(page));
}

Result<ExitlessRing> ExitlessRing::Initialize(int vcpu_fd, Os* os) {
  GM_RETURN_IF_ERROR(CheckBacking(vcpu_fd, /*require_seal=*/false));
  GM_ASSIGN_OR_RETURN(
      Mapping page,
      Mapping::Map(kExitlessRingPageBytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                   static_cast<off_t>(kExitlessRingPageOffset), nullptr, os));
  Page& p = PageOf(page);
  p = Page{};
  p.header.ring_size = kExitlessRingEntries;
  p.header.entry_size = kExitlessEntryBytes;
  Atomic(p.header.version).store(kExitlessRingVersion, std::memory_order_release);
  return ExitlessRing(std::move(page));
}

Result<size_t> ExitlessRing::Pending(std::span<ExitlessEntry> out) const {
  Ring& notify = PageOf(page_).notify;
  const uint32_t head = Atomic(notify.head).load(std::memory_order_acquire);
  const uint32_t tail = Atomic(notify.tail).load(std::memory_order_relaxed);  // ours
  const uint32_t waiting = head - tail;
  if (waiting > kExitlessRingEntries) {
    return Error(ErrorCode::kProtocolError,
                 "exitless APF ring: notify head " + std::to_string(head) + " is " +
                     std::to_string(waiting) + " entries ahead of tail " + std::to_string(tail) +
                     " (at most 64)");
  }
  const size_t n = std::min<size_t>(waiting, out.size());
  for (size_t i = 0; i < n; ++i) {
    const ExitlessEntry& e = notify.entries[(tail + i) % kExitlessRingEntries];
    out[i] = ExitlessEntry{e.gpa, e.flags};
  }
  return n;
}

uint32_t ExitlessRing::notify_tail() const {
  return Atomic(PageOf(page_).notify.tail).load(std::memory_order_relaxed);
}

void ExitlessRing::Consume(uint32_t count) {
  Ring& notify = PageOf(page_).notify;
  const uint32_t tail = Atomic(notify.tail).load(std::memory_order_relaxed);
  Atomic(notify.tail).store(tail + count, std::memory_order_release);
}

bool ExitlessRing::PushCompletion(uint64_t gpa) {
  Ring& complete = PageOf(page_).complete;
  const uint32_t head = Atomic(complete.head).load(std::memory_order_relaxed);  // ours
  const uint32_t tail = Atomic(complete.tail).load(std::memory_order_acquire);
  if (head - tail >= kExitlessRingEntries) return false;
  complete.entries[head % kExitlessRingEntries] = ExitlessEntry{gpa, 0};
  Atomic(complete.head).store(head + 1, std::memory_order_release);
  return true;
}

bool ExitlessRing::Arm() {
  Page& p = PageOf(page_);
  Atomic(p.header.flags).fetch_or(kExitlessNotifyArmed, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t head = Atomic(p.notify.head).load(std::memory_order_acquire);
  if (head == Atomic(p.notify.tail).load(std::memory_order_relaxed)) return true;
  Atomic(p.header.flags).fetch_and(~kExitlessNotifyArmed, std::memory_order_relaxed);
  return false;
}

bool ExitlessRing::Notify(const ExitlessEntry& entry, bool* signal) {
  Page& p = PageOf(page_);
  const uint32_t head = Atomic(p.notify.head).load(std::memory_order_relaxed);  // ours
  const uint32_t tail = Atomic(p.notify.tail).load(std::memory_order_acquire);
  *signal = false;
  if (head - tail >= kExitlessRingEntries) return false;
  p.notify.entries[head % kExitlessRingEntries] = entry;
  Atomic(p.notify.head).store(head + 1, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t flags = Atomic(p.header.flags).load(std::memory_order_relaxed);
  if ((flags & kExitlessNotifyArmed) != 0) {
    // The arm is used up: one signal per arm, as many as the handler re-arms.
    const uint32_t before =
        Atomic(p.header.flags).fetch_and(~kExitlessNotifyArmed, std::memory_order_relaxed);
    *signal = (before & kExitlessNotifyArmed) != 0;
  }
  return true;
}

size_t ExitlessRing::TakeCompletions(std::span<ExitlessEntry> out) {
  Ring& complete = PageOf(page_).complete;
  const uint32_t head = Atomic(complete.head).load(std::memory_order_acquire);
  const uint32_t tail = Atomic(complete.tail).load(std::memory_order_relaxed);  // ours
  const size_t n = std::min<size_t>(head - tail, out.size());
  for (size_t i = 0; i < n; ++i) {
    const ExitlessEntry& e = complete.entries[(tail + i) % kExitlessRingEntries];
    out[i] = ExitlessEntry{e.gpa, e.flags};
  }
  Atomic(complete.tail).store(tail + static_cast<uint32_t>(n), std::memory_order_release);
  return n;
}

}  // namespace guestmem
