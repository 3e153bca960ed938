#include "sim/guest_vm.h"

#include <fcntl.h>
#include <linux/memfd.h>
#include <linux/mman.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>

#include "base/hex.h"
#include "guestmem/apf_control.h"
#include "guestmem/os.h"
#include "guestmem/unix_socket.h"

namespace guestmem::sim {
namespace {

Error BadOption(const std::string& what) {
  return Error(ErrorCode::kInvalidArgument, "guest vm: " + what);
}

Status ValidateOptions(const GuestVmOptions& o) {
  if (o.page_size != kPageSize4K && o.page_size != kHugePageSize2M) {
    return BadOption("page size " + std::to_string(o.page_size) + " is neither 4096 nor 2097152");
  }
  if (o.memory_bytes == 0 || !IsAligned(o.memory_bytes, o.page_size)) {
    return BadOption("memory size " + Hex(o.memory_bytes) +
                     " is not a non-zero multiple of the page size " + Hex(o.page_size));
  }
  if (o.secret_hiding && o.memory_bytes % (8 * kPageSize4K) != 0) {
    return BadOption("memory size " + Hex(o.memory_bytes) +
                     " is not a multiple of 32 KiB, which a userfault bitmap of whole bytes needs");
  }
  if (o.regions < 1 || static_cast<uint64_t>(o.regions) > o.memory_bytes / o.page_size) {
    return BadOption(std::to_string(o.regions) + " regions cannot split " +
                     std::to_string(o.memory_bytes / o.page_size) + " page(s)");
  }
  if (!IsAligned(o.gap_bytes, o.page_size)) {
    return BadOption("gap " + Hex(o.gap_bytes) + " is not aligned to the page size " +
                     Hex(o.page_size));
  }
  const uint64_t gap_count = static_cast<uint64_t>(o.regions - 1);
  if ((gap_count != 0 && o.gap_bytes > UINT64_MAX / gap_count) ||
      !CheckedAdd(o.memory_bytes, o.gap_bytes * gap_count) ||
      !CheckedAdd(o.memory_bytes + o.gap_bytes * gap_count, o.page_size)) {
    return BadOption("memory " + Hex(o.memory_bytes) + " plus gaps overflows the address space");
  }
  return OkStatus();
}

// Free 2 MiB huge pages of the running kernel.
Result<uint64_t> FreeHugePages(Os* os) {
  const char* path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
  const int opened = os->Open(path, O_RDONLY | O_CLOEXEC, 0);
  if (opened < 0) return PosixError(-opened, std::string("open ") + path);
  UniqueFd fd(opened);
  char text[32] = {};
  const ssize_t n = os->Read(fd.get(), text, sizeof(text) - 1);
  if (n < 0) return PosixError(static_cast<int>(-n), std::string("read ") + path);
  uint64_t pages = 0;
  const auto [end, ec] = std::from_chars(text, text + n, pages);
  if (ec != std::errc()) {
    return Error(ErrorCode::kInternal, std::string(path) + " holds '" + text + "'");
  }
  return pages;
}

Result<UniqueFd> CreateMemfd(Os* os, const char* name, unsigned int flags, uint64_t size) {
  const int created = os->MemfdCreate(name, flags | MFD_CLOEXEC);
  if (created < 0) return PosixError(-created, std::string("memfd_create ") + name);
  UniqueFd fd(created);
  const int truncated = os->Ftruncate(fd.get(), static_cast<off_t>(size));
  if (truncated < 0) {
    return PosixError(-truncated, std::string("ftruncate ") + name + " to " + Hex(size));
  }
  return fd;
}

}  // namespace

Result<std::unique_ptr<GuestVm>> GuestVm::Create(const GuestVmOptions& options_in) {
  GuestVmOptions options = options_in;
  if (options.os == nullptr) options.os = Os::Default();
  Os* os = options.os;
  GM_RETURN_IF_ERROR(ValidateOptions(options));
  const bool huge = options.page_size == kHugePageSize2M;
  const uint64_t pages = options.memory_bytes / options.page_size;
  if (huge) {
    GM_ASSIGN_OR_RETURN(uint64_t free_pages, FreeHugePages(os));
    if (free_pages < pages) {
      return Error(ErrorCode::kResourceExhausted,
                   "guest vm: " + std::to_string(pages) + " free 2 MiB huge page(s) needed, " +
                       std::to_string(free_pages) +
                       " free (reserve them in /proc/sys/vm/nr_hugepages)");
    }
  }

  // The uffd exactly as Firecracker builds it.
  UffdOptions uffd_options;
  uffd_options.required_features = kUffdFeatureEventRemove;
  if (options.secret_hiding) {
    uffd_options.required_features |= huge ? kUffdFeatureMinorHugetlbfs : kUffdFeatureMinorShmem;
  }
  uffd_options.non_blocking = true;
  uffd_options.user_mode_only = false;
  uffd_options.os = os;
  auto uffd = Userfaultfd::Create(uffd_options);
  if (!uffd) return std::move(uffd).error().WithContext("guest vm");
  std::unique_ptr<GuestVm> vm(new GuestVm(options, std::move(*uffd)));

  if (options.secret_hiding) {
    GM_ASSIGN_OR_RETURN(vm->memory_file_,
                        CreateMemfd(os, "guestmem-guest-memory",
                                    huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0u, options.memory_bytes));
    // One bit per 4 KiB page whatever the page size, sealed against resizing, as Firecracker's.
    const uint64_t bitmap_bytes = options.memory_bytes / kPageSize4K / 8;
    GM_ASSIGN_OR_RETURN(vm->bitmap_, CreateMemfd(os, "guestmem-guest-memory-bitmap",
                                                 MFD_ALLOW_SEALING, bitmap_bytes));
    if (fcntl(vm->bitmap_.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return PosixError(errno, "guest vm: sealing the userfault bitmap");
    }
    GM_ASSIGN_OR_RETURN(vm->bitmap_view_,
                        Mapping::Map(*AlignUp(bitmap_bytes, kPageSize4K), PROT_READ | PROT_WRITE,
                                     MAP_SHARED, vm->bitmap_.get(), 0, nullptr, os));
    GM_ASSIGN_OR_RETURN(vm->kvm_view_,
                        Mapping::Map(options.memory_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                     vm->memory_file_.get(), 0, nullptr, os));
  }

  // One reservation for all regions and the gaps between them; regions are mapped over it.
  const uint64_t span =
      options.memory_bytes + options.gap_bytes * static_cast<uint64_t>(options.regions - 1);
  GM_ASSIGN_OR_RETURN(
      vm->reservation_,
      Mapping::Map(span + (huge ? options.page_size : 0), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, nullptr, os));
  const uint64_t base = *AlignUp(vm->reservation_.address(), options.page_size);

  const uint64_t pages_per_region = pages / static_cast<uint64_t>(options.regions);
  const UffdModes modes =
      options.secret_hiding ? UffdModes::kMissing | UffdModes::kMinor : UffdModes::kMissing;
  uint64_t offset = 0;
  for (int i = 0; i < options.regions; ++i) {
    const bool last = i == options.regions - 1;
    const uint64_t size =
        last ? options.memory_bytes - offset : pages_per_region * options.page_size;
    const uint64_t gap = options.gap_bytes * static_cast<uint64_t>(i);
    void* want = reinterpret_cast<void*>(base + offset + gap);
    int flags = MAP_FIXED | MAP_NORESERVE;
    int fd = -1;
    off_t map_offset = 0;
    if (options.secret_hiding) {
      flags |= MAP_SHARED;
      fd = vm->memory_file_.get();
      map_offset = static_cast<off_t>(offset);
    } else {
      flags |= MAP_PRIVATE | MAP_ANONYMOUS | (huge ? MAP_HUGETLB | MAP_HUGE_2MB : 0);
    }
    void* got = nullptr;
    const int mapped = os->Mmap(want, size, PROT_READ | PROT_WRITE, flags, fd, map_offset, &got);
    if (mapped < 0) {
      return PosixError(-mapped, "guest vm: mmap region " + std::to_string(i) + " of " + Hex(size) +
                                     " bytes at " + Hex(base + offset + gap));
    }
    const HostVirtAddr host(reinterpret_cast<uint64_t>(got));
    auto registered = vm->uffd_.Register(host, size, modes);
    if (!registered) {
      return std::move(registered)
          .error()
          .WithContext("guest vm: register region " + std::to_string(i));
    }
    vm->regions_.push_back(
        GuestVmRegion{{static_cast<std::byte*>(got), size}, offset, offset + gap});
    HandshakeRegion h;
    h.base_host_virt_addr = host.value();
    h.size = size;
    h.offset = offset;
    h.page_size = options.page_size;
    h.page_size_kib = options.page_size;  // deprecated; bytes despite its name, as Firecracker
    if (options.secret_hiding) {
      h.gpa_start = offset + gap;
      h.is_guest_memfd = true;
    }
    vm->handshake_.push_back(h);
    offset += size;
  }
  return vm;
}

GuestVm::~GuestVm() = default;

std::vector<int> GuestVm::handshake_fds() const {
  std::vector<int> fds = {uffd_.fd()};
  if (options_.secret_hiding) {
    fds.push_back(memory_file_.get());
    fds.push_back(bitmap_.get());
  }
  return fds;
}

Status GuestVm::Connect(const std::string& socket_path) {
  if (connected()) {
    return Error(ErrorCode::kFailedPrecondition,
                 "guest vm: connect " + socket_path + ": already handed over");
  }
  auto socket = ConnectUnix(socket_path);
  if (!socket) return std::move(socket).error().WithContext("guest vm: connect " + socket_path);
  return SendHandshakeOn(std::move(*socket));
}

Status GuestVm::SendHandshakeOn(UniqueFd socket) {
  if (connected()) {
    return Error(ErrorCode::kFailedPrecondition, "guest vm: handshake: already handed over");
  }
  const std::vector<int> fds = handshake_fds();
  auto sent = SendHandshake(socket.get(), handshake_, fds, options_.os);
  if (!sent) return std::move(sent).error().WithContext("guest vm: handshake");
  socket_ = std::move(socket);
  return OkStatus();
}

Status GuestVm::ConnectApf(const std::string& path) {
  auto socket = ConnectUnix(path);
  if (!socket) return std::move(socket).error().WithContext("guest vm: connect " + path);
  apf_socket_ = std::move(*socket);
  return OkStatus();
}

void GuestVm::FillUserfaultBitmap() {
  std::memset(bitmap_view_.data(), 0xff, options_.memory_bytes / kPageSize4K / 8);
}

bool GuestVm::UserfaultBitSet(uint64_t file_offset) const {
  const uint64_t page = file_offset / kPageSize4K;
  auto* words = static_cast<uint64_t*>(bitmap_view_.data());
  const uint64_t word = std::atomic_ref<uint64_t>(words[page / 64]).load(std::memory_order_acquire);
  return ((word >> (page % 64)) & 1) != 0;
}

Status GuestVm::SendApfControl(std::span<const int> exitless_fds) {
  if (!connected()) {
    return Error(ErrorCode::kFailedPrecondition, "guest vm: message 2 before the handshake");
  }
  return guestmem::SendApfControl(socket_.get(), exitless_fds, options_.os);
}

std::byte* GuestVm::KvmAddress(uint64_t file_offset) const {
  return kvm_view_.bytes() + file_offset;
}

uint64_t GuestVm::GuestPhys(uint64_t file_offset) const {
  for (const GuestVmRegion& r : regions_) {
    if (file_offset >= r.file_offset && file_offset - r.file_offset < r.host.size()) {
      return r.guest_phys + (file_offset - r.file_offset);
    }
  }
  return 0;
}

std::byte* GuestVm::HostAddress(uint64_t file_offset) const {
  for (const GuestVmRegion& r : regions_) {
    if (file_offset >= r.file_offset && file_offset - r.file_offset < r.host.size()) {
      return r.host.data() + (file_offset - r.file_offset);
    }
  }
  return nullptr;
}

}  // namespace guestmem::sim
