#include "guestmem/page_installer.h"

#include <sys/mman.h>

#include <algorithm>
#include <cassert>

namespace guestmem {
namespace {

using Outcome = InstallProgress::Outcome;

HostVirtAddr HostOf(const GuestRegion& region, uint64_t offset) {
  return region.host_addr.UncheckedAdd(offset);
}

uint64_t FileOf(const GuestRegion& region, uint64_t offset) {
  return region.file_offset.value() + offset;
}

void Count(std::atomic<uint64_t>& counter, uint64_t bytes) {
  counter.fetch_add(bytes / kPageSize4K, std::memory_order_relaxed);
}

// Bytes the kernel reports installed, as whole pages, never more than asked for.
uint64_t InstalledBytes(const UffdProgress& progress, uint64_t page, uint64_t asked) {
  const auto bytes = static_cast<uint64_t>(std::max<int64_t>(progress.bytes, 0));
  return std::min(AlignDown(bytes, page), asked);
}

// Runs `install(at, length)` (one ioctl over [at, at + length) of the region) until the whole of
// [offset, offset + length) is mapped or the kernel says why it cannot go on. A prefix installed
// before the kernel stopped is not installed again: the rest is retried at once (EAGAIN with
// progress means the kernel met a page already mapped, or an error it reports on the retry). A
// page found mapped (EEXIST) is skipped after waking whoever waits on it.
template <typename InstallFn>
Result<InstallProgress> InstallUntilDone(Userfaultfd& uffd, const GuestRegion& region,
                                         uint64_t offset, uint64_t length,
                                         std::atomic<uint64_t>& counter, InstallFn install) {
  const uint64_t page = region.page_size;
  const uint64_t end = offset + length;
  uint64_t at = offset;
  while (at < end) {
    const Result<UffdProgress> step = install(at, end - at);
    if (!step) return step.error();
    const uint64_t bytes = InstalledBytes(*step, page, end - at);
    Count(counter, bytes);
    at += bytes;
    switch (step->outcome) {
      case UffdProgress::Outcome::kDone:
        return InstallProgress{Outcome::kDone, length};
      case UffdProgress::Outcome::kAgain:
        if (bytes > 0) continue;
        return InstallProgress{Outcome::kAgain, at - offset};
      case UffdProgress::Outcome::kExists:
        GM_RETURN_IF_ERROR(uffd.Wake(HostOf(region, at), page));
        at += page;
        continue;
      case UffdProgress::Outcome::kNoMapping:
        return InstallProgress{Outcome::kNoMapping, at - offset};
      case UffdProgress::Outcome::kTaskGone:
        return InstallProgress{Outcome::kTaskGone, at - offset};
    }
  }
  return InstallProgress{Outcome::kDone, length};
}

// hugetlb's UFFDIO_COPY cannot fault its source in: where a source page is not mapped yet, the
// kernel copies through a temporary huge page from the pool, which a pool sized exactly for the
// guest does not have (ENOMEM, and the page is poisoned). Touching the source first spares it.
void TouchSource(const std::byte* data, uint64_t length) {
  for (uint64_t i = 0; i < length; i += kPageSize4K) {
    (void)*static_cast<const volatile std::byte*>(data + i);
  }
}

// Progress of a step that began `before` bytes into the whole range, as progress of the whole.
InstallProgress Shifted(InstallProgress step, uint64_t before) {
  step.bytes += before;
  return step;
}

}  // namespace

Result<Mapping> MapZeros(uint64_t bytes) {
  const uint64_t size = AlignUp(std::max(bytes, kHugePageSize2M), kHugePageSize2M).value_or(0);
  if (size == 0) return Error(ErrorCode::kInvalidArgument, "zero mapping: size overflows");
  // Populated (with the shared zero page: nothing is allocated) so that hugetlb copies from it
  // never meet an unmapped source (TouchSource).
  return Mapping::Map(size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE,
                      -1, 0);
}

// --- CopyInstaller -----------------------------------------------------------------------------

Result<InstallProgress> CopyInstaller::Install(const GuestRegion& region, uint64_t offset,
                                               uint64_t length, const Content& content) {
  assert(length > 0 && IsAligned(offset | length, region.page_size));
  switch (content.kind) {
    case ContentKind::kData: {
      assert(content.data.size() == length);
      const std::byte* data = content.data.data();
      if (region.page_size > kPageSize4K) TouchSource(data, length);
      return InstallUntilDone(*uffd_, region, offset, length, counters_.copied,
                              [&](uint64_t at, uint64_t len) {
                                return uffd_->Copy(HostOf(region, at), data + (at - offset), len);
                              });
    }
    case ContentKind::kZero:
      if (region.page_size == kPageSize4K) {
        return InstallUntilDone(
            *uffd_, region, offset, length, counters_.zeroed,
            [&](uint64_t at, uint64_t len) { return uffd_->ZeroPage(HostOf(region, at), len); });
      }
      // hugetlb has no UFFDIO_ZEROPAGE.
      return CopyZeros(region, offset, length, counters_.zeroed);
    case ContentKind::kZeroToWrite:
      return CopyZeros(region, offset, length, counters_.zeroed);
    case ContentKind::kInFile:
      break;
  }
  return Error(ErrorCode::kInvalidArgument,
               "copy installer: anonymous memory has no file content to map");
}

Result<InstallProgress> CopyInstaller::CopyZeros(const GuestRegion& region, uint64_t offset,
                                                 uint64_t length, std::atomic<uint64_t>& counter) {
  const uint64_t step = AlignDown(zeros_->size(), region.page_size);
  assert(step > 0);
  for (uint64_t at = offset; at < offset + length;) {
    const uint64_t len = std::min(step, offset + length - at);
    GM_ASSIGN_OR_RETURN(
        InstallProgress done,
        InstallUntilDone(*uffd_, region, at, len, counter, [&](uint64_t a, uint64_t l) {
          return uffd_->Copy(HostOf(region, a), zeros_->data(), l);
        }));
    if (done.outcome != Outcome::kDone) return Shifted(done, at - offset);
    at += len;
  }
  return InstallProgress{Outcome::kDone, length};
}

// --- MinorTrapInstaller ------------------------------------------------------------------------

Result<InstallProgress> MinorTrapInstaller::Install(const GuestRegion& region, uint64_t offset,
                                                    uint64_t length, const Content& content) {
  assert(length > 0 && IsAligned(offset | length, region.page_size));
  assert(content.kind != ContentKind::kData || content.data.size() == length);
  // Runs of pages the file holds already (only continued) and pages it does not (written first).
  for (uint64_t run = offset; run < offset + length;) {
    bool prepared = false;
    const uint64_t run_length = RunFrom(region, run, offset + length, &prepared);
    Content piece = content;
    if (content.kind == ContentKind::kData) {
      piece.data = content.data.subspan(run - offset, run_length);
    }
    GM_ASSIGN_OR_RETURN(InstallProgress done, InstallRun(region, run, run_length, prepared, piece));
    if (done.outcome != Outcome::kDone) return Shifted(done, run - offset);
    run += run_length;
  }
  return InstallProgress{Outcome::kDone, length};
}

uint64_t MinorTrapInstaller::RunFrom(const GuestRegion& region, uint64_t at, uint64_t end,
                                     bool* prepared) const {
  const uint64_t page = region.page_size;
  const PageStateMap& states = file_->pages();
  const uint64_t first = FileOf(region, at) / page;
  const uint64_t last = FileOf(region, end) / page;
  *prepared = states.Get(first) == PageState::kPrepared;
  const uint64_t run_end =
      *prepared ? states.NextNotPrepared(first, last) : states.NextPrepared(first, last);
  return (run_end - first) * page;
}

Result<InstallProgress> MinorTrapInstaller::InstallRun(const GuestRegion& region, uint64_t offset,
                                                       uint64_t length, bool prepared,
                                                       const Content& content) {
  // Maps pages whose content is in the file, counted as `counter` says how it got there.
  auto continue_range = [&](uint64_t at, uint64_t len, std::atomic<uint64_t>& counter) {
    return InstallUntilDone(*uffd_, region, at, len, counter, [&](uint64_t a, uint64_t l) {
      return uffd_->Continue(HostOf(region, a), l);
    });
  };
  if (prepared) return continue_range(offset, length, counters_.continued);

  const uint64_t file_offset = FileOf(region, offset);
  if (content.kind == ContentKind::kData) {
    auto populated = file_->Populate(FileOffset(file_offset), content.data);
    // kAlreadyExists: another writer put content there first; it is only mapped then.
    if (!populated && populated.error().code() != ErrorCode::kAlreadyExists) {
      return std::move(populated).error();
    }
    return continue_range(offset, length, counters_.continued);
  }
  if (region.page_size != kPageSize4K) {
    GM_RETURN_IF_ERROR(PopulateZeros(file_offset, length));
    return continue_range(offset, length, counters_.zeroed);
  }
  // 4 KiB zeros: UFFDIO_ZEROPAGE allocates a zeroed page in the file's page cache and maps it, in
  // one step. A page found in the page cache (EEXIST) is mapped as it is.
  const uint64_t end = offset + length;
  for (uint64_t at = offset; at < end;) {
    const Result<UffdProgress> step = uffd_->ZeroPage(HostOf(region, at), end - at);
    if (!step) return step.error();
    const uint64_t bytes = InstalledBytes(*step, kPageSize4K, end - at);
    if (bytes > 0) {
      (void)file_->MarkPrepared(FileOffset(FileOf(region, at)), bytes);
      Count(counters_.zeroed, bytes);
      at += bytes;
    }
    switch (step->outcome) {
      case UffdProgress::Outcome::kDone:
        return InstallProgress{Outcome::kDone, length};
      case UffdProgress::Outcome::kAgain:
        if (bytes > 0) continue;
        return InstallProgress{Outcome::kAgain, at - offset};
      case UffdProgress::Outcome::kExists: {
        GM_ASSIGN_OR_RETURN(InstallProgress mapped,
                            continue_range(at, kPageSize4K, counters_.continued));
        if (mapped.outcome != Outcome::kDone) return Shifted(mapped, at - offset);
        at += kPageSize4K;
        continue;
      }
      case UffdProgress::Outcome::kNoMapping:
        return InstallProgress{Outcome::kNoMapping, at - offset};
      case UffdProgress::Outcome::kTaskGone:
        return InstallProgress{Outcome::kTaskGone, at - offset};
    }
  }
  return InstallProgress{Outcome::kDone, length};
}

Status MinorTrapInstaller::Populate(const GuestRegion& region, uint64_t offset, uint64_t length,
                                    const Content& content) {
  assert(length > 0 && IsAligned(offset | length, region.page_size));
  for (uint64_t run = offset; run < offset + length;) {
    bool prepared = false;
    const uint64_t run_length = RunFrom(region, run, offset + length, &prepared);
    if (!prepared && content.kind == ContentKind::kData) {
      auto populated = file_->Populate(FileOffset(FileOf(region, run)),
                                       content.data.subspan(run - offset, run_length));
      // kAlreadyExists: another writer put content there first.
      if (!populated && populated.error().code() != ErrorCode::kAlreadyExists) {
        return std::move(populated).error();
      }
      Count(counters_.populated, run_length);
    } else if (!prepared && content.kind != ContentKind::kInFile) {
      GM_RETURN_IF_ERROR(PopulateZeros(FileOf(region, run), run_length));
      Count(counters_.populated, run_length);
    }
    run += run_length;
  }
  return OkStatus();
}

Status MinorTrapInstaller::PopulateZeros(uint64_t file_offset, uint64_t length) {
  const uint64_t step = AlignDown(zeros_->size(), file_->page_size());
  for (uint64_t at = file_offset; at < file_offset + length;) {
    const uint64_t len = std::min(step, file_offset + length - at);
    auto populated = file_->Populate(FileOffset(at), zeros_->span().first(len));
    if (!populated && populated.error().code() != ErrorCode::kAlreadyExists) {
      return std::move(populated).error();
    }
    at += len;
  }
  return OkStatus();
}

}  // namespace guestmem
