#include "memory/backend.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/magic.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>

#include "base/hex.h"
#include "guestmem/os.h"
#include "guestmem/userfaultfd.h"

namespace guestmem::memory_internal {
namespace {

Status Truncate(int fd, uint64_t size, std::string_view what, Os* os) {
  const int rc = os->Ftruncate(fd, static_cast<off_t>(size));
  if (rc < 0) return PosixError(-rc, std::string(what) + ": ftruncate to " + Hex(size) + " bytes");
  return OkStatus();
}

Result<BackendObject> CreateMemfd(const std::string& name, unsigned int flags, uint64_t size,
                                  std::string_view what, Os* os) {
  const int fd = os->MemfdCreate(name.c_str(), MFD_CLOEXEC | flags);
  if (fd < 0) {
    if (-fd == EINVAL && (flags & MFD_HUGETLB) != 0) {
      return Error(ErrorCode::kUnsupported,
                   std::string(what) + ": this kernel has no hugetlbfs memfd (MFD_HUGETLB)", -fd);
    }
    return PosixError(-fd, std::string(what) + ": memfd_create \"" + name + "\"");
  }
  BackendObject object;
  object.fd = UniqueFd(fd);
  GM_RETURN_IF_ERROR(Truncate(fd, size, what, os));
  return object;
}

Result<BackendObject> CreateSecret(uint64_t size, Os* os) {
  const int fd = os->MemfdSecret(O_CLOEXEC);
  if (fd < 0) {
    if (-fd == ENOSYS) {
      return Error(ErrorCode::kUnsupported,
                   "create secret memory: memfd_secret unavailable (a kernel without secretmem, "
                   "or booted with secretmem.enable=0)",
                   -fd);
    }
    return PosixError(-fd, "create secret memory: memfd_secret");
  }
  BackendObject object;
  object.fd = UniqueFd(fd);
  GM_RETURN_IF_ERROR(Truncate(fd, size, "create secret memory", os));
  return object;
}

Result<BackendObject> CreateGuestMemfd(uint64_t size, Os* os) {
  const int kvm = os->Open("/dev/kvm", O_RDWR | O_CLOEXEC, 0);
  if (kvm == -ENOENT || kvm == -ENODEV || kvm == -ENXIO) {
    return Error(ErrorCode::kUnsupported, "no /dev/kvm: KVM guest_memfd unavailable", -kvm);
  }
  if (kvm < 0) return PosixError(-kvm, "create guest_memfd: open /dev/kvm");
  UniqueFd kvm_fd(kvm);
  const int vm = os->Ioctl(kvm_fd.get(), KVM_CREATE_VM, nullptr);
  if (vm < 0) return PosixError(-vm, "create guest_memfd: KVM_CREATE_VM");
  BackendObject object;
  object.vm_fd = UniqueFd(vm);
  // Mappable and shared with the host from the start; kernels before 6.18 know only the first
  // flag (and then share every page), so fall back to it.
  int fd = -EINVAL;
  for (uint64_t flags : {kGuestMemfdFlagMmap | kGuestMemfdFlagInitShared, kGuestMemfdFlagMmap}) {
    KvmCreateGuestMemfd request{};
    request.size = size;
    request.flags = flags;
    fd = os->Ioctl(object.vm_fd.get(), kKvmCreateGuestMemfd, &request);
    if (fd != -EINVAL) break;
  }
  if (fd == -ENOTTY) {
    return Error(ErrorCode::kUnsupported,
                 "this kernel's KVM has no guest_memfd (KVM_CREATE_GUEST_MEMFD)", -fd);
  }
  if (fd == -EINVAL) {
    return Error(ErrorCode::kUnsupported,
                 "this kernel's KVM refuses a mappable guest_memfd (GUEST_MEMFD_FLAG_MMAP)", -fd);
  }
  if (fd < 0) return PosixError(-fd, "create guest_memfd: KVM_CREATE_GUEST_MEMFD");
  object.fd = UniqueFd(fd);
  // KVM hands out the descriptor without close-on-exec. Not a failure worth an Os hook: a
  // descriptor inherited across exec wastes memory but is otherwise harmless.
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  return object;
}

// The userfaultfd modes a mapping at `start` of `length` bytes accepts, or the reason none can be
// tried.
UffdModes ProbeUffdModes(HostVirtAddr start, uint64_t length, Os* os, std::string* why_none) {
  UffdOptions options;
  options.optional_features = kUffdFeatureMissingShmem | kUffdFeatureMissingHugetlbfs |
                              kUffdFeatureMinorShmem | kUffdFeatureMinorHugetlbfs |
                              kUffdFeatureWpHugetlbfsShmem;
  options.os = os;
  auto uffd = Userfaultfd::Create(options);
  if (!uffd) {
    *why_none = "userfaultfd unavailable: " + uffd.error().ToString();
    return UffdModes::kNone;
  }
  UffdModes modes = UffdModes::kNone;
  for (UffdModes mode : {UffdModes::kMissing, UffdModes::kWriteProtect, UffdModes::kMinor}) {
    if (uffd->Register(start, length, mode)) {
      modes = modes | mode;
      (void)uffd->Unregister(start, length);  // the scratch uffd and mapping go away anyway
    }
  }
  return modes;
}

std::string BaseNote(MemoryBackend backend) {
  switch (backend) {
    case MemoryBackend::kShmem:
      return "memfd on shmem: write(2) fills pages; MINOR faults trap pages already in the file";
    case MemoryBackend::kHugetlb:
      return "memfd on hugetlbfs, 2 MiB pages from vm.nr_hugepages; no write(2): Populate writes "
             "through a temporary mapping";
    case MemoryBackend::kAnonymous:
      return "private anonymous memory: content arrives by UFFDIO_COPY into its one mapping";
    case MemoryBackend::kSecret:
      return "memfd_secret: pages leave the kernel direct map; no write(2), no userfaultfd, no "
             "hole punching: write content through a mapping, then MarkPrepared";
    case MemoryBackend::kGuestMemfd:
      return "KVM guest_memfd, mappable";
  }
  return "";
}

}  // namespace

uint64_t BackendPageSize(MemoryBackend backend) {
  return backend == MemoryBackend::kHugetlb ? kHugePageSize2M : kPageSize4K;
}

Result<BackendObject> CreateBackendObject(MemoryBackend backend, const std::string& name,
                                          uint64_t size, Os* os) {
  switch (backend) {
    case MemoryBackend::kShmem:
      return CreateMemfd(name, 0, size, "create shmem memory", os);
    case MemoryBackend::kHugetlb:
      return CreateMemfd(name, MFD_HUGETLB | MFD_HUGE_2MB, size, "create hugetlb memory", os);
    case MemoryBackend::kAnonymous: {
      auto mapping = Mapping::Anonymous(size, MAP_NORESERVE, os);
      if (!mapping) return std::move(mapping).error().WithContext("create anonymous memory");
      BackendObject object;
      object.anonymous = std::move(*mapping);
      return object;
    }
    case MemoryBackend::kSecret:
      return CreateSecret(size, os);
    case MemoryBackend::kGuestMemfd:
      return CreateGuestMemfd(size, os);
  }
  return Error(ErrorCode::kInvalidArgument,
               "create memory: unknown backend " + std::to_string(static_cast<int>(backend)));
}

}  // namespace guestmem::memory_internal

namespace guestmem {

Result<MemoryBackend> IdentifyBackend(int fd) {
  // Anonymous-inode files (guest_memfd, memfd_secret) are known by their /proc link; memfds by
  // the file system they live on.
  if (fd < 0) return Error(ErrorCode::kInvalidArgument, "identify memory file: no descriptor");
  char link[128];
  const std::string proc = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = readlink(proc.c_str(), link, sizeof(link) - 1);
  if (n < 0) return PosixError(errno, "identify memory file: descriptor " + std::to_string(fd));
  const std::string_view target(link, static_cast<size_t>(n));
  if (target == "anon_inode:[kvm-gmem]") return MemoryBackend::kGuestMemfd;
  if (target.starts_with("/secretmem")) return MemoryBackend::kSecret;
  struct statfs fs = {};
  if (fstatfs(fd, &fs) != 0) {
    return PosixError(errno, "identify memory file: fstatfs of " + std::string(target));
  }
  if (fs.f_type == HUGETLBFS_MAGIC) return MemoryBackend::kHugetlb;
  if (fs.f_type == TMPFS_MAGIC) return MemoryBackend::kShmem;
  return Error(ErrorCode::kInvalidArgument,
               "identify memory file: " + std::string(target) +
                   " is not a guest memory file (memfd, hugetlbfs, memfd_secret or guest_memfd)");
}

}  // namespace guestmem

namespace guestmem::memory_internal {

BackendCapabilities DescribeBackend(MemoryBackend backend, int fd, Os* os) {
  BackendCapabilities caps;
  caps.backend = backend;
  caps.page_size = BackendPageSize(backend);
  caps.direct_map_removed = backend == MemoryBackend::kSecret;
  caps.note = BaseNote(backend);
  Result<Mapping> scratch = Error(ErrorCode::kInternal, "");
  if (backend == MemoryBackend::kAnonymous) {
    scratch = Mapping::Anonymous(caps.page_size, MAP_NORESERVE, os);
  } else {
    // A write of nothing fails with EINVAL (no write_iter) or ESPIPE (no pwrite) where write(2)
    // is missing, and changes nothing where it exists.
    const char nothing = 0;
    caps.populate_by_write = os->Pwrite(fd, &nothing, 0, 0) == 0;
    scratch = Mapping::Map(caps.page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd,
                           0, nullptr, os);
  }
  caps.mmap_allowed = scratch.has_value();
  if (!scratch) {
    caps.note += " (cannot be mapped: " + scratch.error().ToString() + ")";
    return caps;
  }
  std::string why_none;
  caps.uffd_modes = ProbeUffdModes(HostVirtAddr(scratch->address()), caps.page_size, os, &why_none);
  if (!why_none.empty()) caps.note += " (" + why_none + ")";
  return caps;
}

std::string NrHugepages(Os* os) {
  const int fd = os->Open("/proc/sys/vm/nr_hugepages", O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return "unknown";
  UniqueFd file(fd);
  char buf[32] = {};
  const ssize_t n = os->Read(file.get(), buf, sizeof(buf) - 1);
  if (n <= 0) return "unknown";
  std::string text(buf, static_cast<size_t>(n));
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

}  // namespace guestmem::memory_internal
