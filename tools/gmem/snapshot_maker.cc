#include "snapshot_maker.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

#include "base/hex.h"
#include "guestmem/address.h"
#include "guestmem/os.h"
#include "guestmem/unique_fd.h"
#include "sim/random.h"

namespace guestmem::cli {
namespace {

using sim::SplitMix64;

constexpr uint64_t kPage = kPageSize4K;
constexpr uint64_t kMaxRun = 16;
constexpr uint64_t kWriteChunkPages = 256;  // 1 MiB per pwrite at most

constexpr std::array<std::string_view, 48> kWords = {
    "the",      "memory",  "page",   "guest",  "kernel",   "struct",   "return", "static",
    "if",       "else",    "for",    "while",  "int",      "void",     "const",  "unsigned",
    "fault",    "handler", "region", "offset", "snapshot", "restore",  "vcpu",   "device",
    "mmio",     "virtio",  "queue",  "buffer", "request",  "response", "GET",    "PUT",
    "HTTP/1.1", "200",     "OK",     "error",  "warning",  "info",     "debug",  "{",
    "}",        "(",       ")",      ";",      "=",        "->",       "null",   "true"};

// Independent generators per page, so any page can be produced on its own.
SplitMix64 PageRng(uint64_t seed, uint64_t page, uint64_t salt) {
  SplitMix64 mix(seed ^ (page * 0xd1b54a32d192ed03ULL) ^ salt);
  return SplitMix64(mix.Next());
}

void FillText(SplitMix64& rng, std::span<std::byte> out) {
  size_t pos = 0;
  size_t line = 0;
  auto put = [&](char c) {
    if (pos < out.size()) out[pos++] = static_cast<std::byte>(c);
  };
  while (pos < out.size()) {
    const std::string_view word = kWords[rng.Below(kWords.size())];
    if (line + word.size() + 1 > 72) {
      put('\n');
      line = 0;
      for (uint64_t indent = rng.Below(3) * 2; indent > 0; --indent) put(' ');
    }
    for (char c : word) put(c);
    put(' ');
    line += word.size() + 1;
    if (rng.Below(8) == 0) {  // a number now and then, so pages differ beyond their words
      char digits[24];
      const int n = std::snprintf(digits, sizeof(digits), "%llu ",
                                  static_cast<unsigned long long>(rng.Below(100000)));
      for (int i = 0; i < n; ++i) put(digits[i]);
      line += static_cast<size_t>(n);
    }
  }
}

void FillRandom(SplitMix64& rng, std::span<std::byte> out) {
  for (size_t i = 0; i < out.size(); i += sizeof(uint64_t)) {
    const uint64_t word = rng.Next();
    std::memcpy(out.data() + i, &word, std::min(sizeof(word), out.size() - i));
  }
}

Status ValidateOptions(const SnapshotMakerOptions& o) {
  if (o.size_bytes == 0 || !IsAligned(o.size_bytes, kPage)) {
    return Error(ErrorCode::kInvalidArgument, "snapshot create: size " + Hex(o.size_bytes) +
                                                  " is not a non-zero multiple of 4096");
  }
  const double fractions[] = {o.zero_fraction, o.text_fraction, o.random_fraction};
  for (double f : fractions) {
    if (!(f >= 0)) {
      return Error(ErrorCode::kInvalidArgument,
                   "snapshot create: fraction " + std::to_string(f) + " is negative");
    }
  }
  const double sum = o.zero_fraction + o.text_fraction + o.random_fraction;
  if (std::fabs(sum - 1) > 1e-6) {
    return Error(ErrorCode::kInvalidArgument,
                 "snapshot create: zero, text and random fractions "
                 "add up to " +
                     std::to_string(sum) + ", not 1");
  }
  return OkStatus();
}

}  // namespace

void FillSnapshotPage(SnapshotPageKind kind, uint64_t seed, uint64_t page,
                      std::span<std::byte> out) {
  SplitMix64 rng = PageRng(seed, page, static_cast<uint64_t>(kind));
  switch (kind) {
    case SnapshotPageKind::kZero:
      std::memset(out.data(), 0, out.size());
      break;
    case SnapshotPageKind::kText:
      FillText(rng, out);
      break;
    case SnapshotPageKind::kRandom:
      FillRandom(rng, out);
      break;
  }
}

Result<SnapshotSummary> MakeSnapshot(const std::string& path, const SnapshotMakerOptions& options) {
  GM_RETURN_IF_ERROR(ValidateOptions(options));
  Os* os = options.os != nullptr ? options.os : Os::Default();
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (options.overwrite ? O_TRUNC : O_EXCL);
  const int opened = os->Open(path.c_str(), flags, 0644);
  if (opened < 0) return PosixError(-opened, "snapshot create: open " + path);
  UniqueFd fd(opened);
  const int truncated = os->Ftruncate(fd.get(), static_cast<off_t>(options.size_bytes));
  if (truncated < 0) {
    return PosixError(-truncated,
                      "snapshot create: ftruncate " + path + " to " + Hex(options.size_bytes));
  }

  SnapshotSummary summary;
  summary.size_bytes = options.size_bytes;
  summary.pages = options.size_bytes / kPage;
  summary.seed = options.seed;
  std::vector<std::byte> chunk(kWriteChunkPages * kPage);
  uint64_t chunk_first = 0;  // page of chunk[0]
  uint64_t chunk_pages = 0;
  auto flush = [&]() -> Status {
    uint64_t done = 0;
    const uint64_t bytes = chunk_pages * kPage;
    while (done < bytes) {
      const uint64_t at = chunk_first * kPage + done;
      const ssize_t n =
          os->Pwrite(fd.get(), chunk.data() + done, bytes - done, static_cast<off_t>(at));
      if (n == -EINTR) continue;
      if (n < 0)
        return PosixError(static_cast<int>(-n),
                          "snapshot create: pwrite " + path + " at " + Hex(at));
      done += static_cast<uint64_t>(n);
    }
    chunk_pages = 0;
    return OkStatus();
  };

  SplitMix64 kinds(options.seed);
  const double text_cut = options.zero_fraction + options.text_fraction;
  for (uint64_t page = 0; page < summary.pages;) {
    const double u = static_cast<double>(kinds.Next() >> 11) * 0x1.0p-53;
    const SnapshotPageKind kind = u < options.zero_fraction ? SnapshotPageKind::kZero
                                  : u < text_cut            ? SnapshotPageKind::kText
                                                            : SnapshotPageKind::kRandom;
    const uint64_t run = std::min(kinds.Between(1, kMaxRun), summary.pages - page);
    for (uint64_t p = page; p < page + run; ++p) {
      if (kind == SnapshotPageKind::kZero && options.holes) {
        ++summary.zero_pages;
        if (chunk_pages > 0) GM_RETURN_IF_ERROR(flush());  // a hole: never written
        continue;
      }
      if (chunk_pages == kWriteChunkPages) GM_RETURN_IF_ERROR(flush());
      if (chunk_pages == 0) chunk_first = p;
      std::span<std::byte> out = std::span(chunk).subspan(chunk_pages * kPage, kPage);
      if (kind == SnapshotPageKind::kZero) {
        ++summary.zero_pages;
        std::fill(out.begin(), out.end(), std::byte{0});
      } else {
        ++(kind == SnapshotPageKind::kText ? summary.text_pages : summary.random_pages);
        FillSnapshotPage(kind, options.seed, p, out);
      }
      ++chunk_pages;
    }
    page += run;
    if (options.progress && (page % kWriteChunkPages < run || page == summary.pages)) {
      options.progress(page, summary.pages);
    }
  }
  if (chunk_pages > 0) GM_RETURN_IF_ERROR(flush());
  return summary;
}

Result<VariantSummary> MakeVariant(const std::string& base, const std::string& path,
                                   const VariantOptions& options) {
  if (!(options.change_fraction >= 0 && options.change_fraction <= 1)) {
    return Error(ErrorCode::kInvalidArgument, "snapshot create: --change must lie in [0, 1]");
  }
  UniqueFd in(open(base.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return PosixError(errno, "snapshot create: open " + base);
  struct stat st {};
  if (fstat(in.get(), &st) != 0) return PosixError(errno, "snapshot create: stat " + base);
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size == 0 || size % kPage != 0) {
    return Error(ErrorCode::kInvalidArgument,
                 "snapshot create: " + base + " is not a whole number of 4 KiB pages");
  }
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (options.overwrite ? O_TRUNC : O_EXCL);
  UniqueFd out(open(path.c_str(), flags, 0644));
  if (!out) return PosixError(errno, "snapshot create: open " + path);
  if (ftruncate(out.get(), static_cast<off_t>(size)) != 0) {
    return PosixError(errno, "snapshot create: ftruncate " + path);
  }
  VariantSummary summary{.pages = size / kPage};
  SplitMix64 pick(options.seed ^ 0x7a11a7e5ULL);
  std::vector<std::byte> chunk(kWriteChunkPages * kPage);
  for (uint64_t first = 0; first < summary.pages; first += kWriteChunkPages) {
    const uint64_t pages = std::min<uint64_t>(kWriteChunkPages, summary.pages - first);
    const uint64_t bytes = pages * kPage;
    const off_t at = static_cast<off_t>(first * kPage);
    if (pread(in.get(), chunk.data(), bytes, at) != static_cast<ssize_t>(bytes)) {
      return PosixError(errno != 0 ? errno : EIO, "snapshot create: read " + base);
    }
    for (uint64_t p = 0; p < pages; ++p) {
      std::span<std::byte> page = std::span(chunk).subspan(p * kPage, kPage);
      const double u = static_cast<double>(pick.Next() >> 11) * 0x1.0p-53;
      if (u < options.change_fraction) {
        ++summary.changed_pages;
        const auto kind = pick.Next() % 5 < 3 ? SnapshotPageKind::kText : SnapshotPageKind::kRandom;
        FillSnapshotPage(kind, options.seed + 0x100000, first + p, page);
        if (options.diff_only &&
            pwrite(out.get(), page.data(), kPage, at + static_cast<off_t>(p * kPage)) !=
                static_cast<ssize_t>(kPage)) {
          return PosixError(errno, "snapshot create: write " + path);
        }
      }
    }
    if (!options.diff_only && pwrite(out.get(), chunk.data(), bytes, at) !=
                                  static_cast<ssize_t>(bytes)) {
      return PosixError(errno, "snapshot create: write " + path);
    }
  }
  return summary;
}

}  // namespace guestmem::cli
