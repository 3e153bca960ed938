#include "guestmem/zero_map.h"

#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "base/zero_page.h"
#include "source/kept_form.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = kPageSize4K;
constexpr uint64_t kScanChunk = uint64_t{4} << 20;
constexpr uint64_t kSamplePages = 64;
constexpr char kMagic[9] = "GMZEROM1";
constexpr uint32_t kVersion = 1;

Error Corrupt(const std::string& what) { return Error(ErrorCode::kDataLoss, "zero map: " + what); }

}  // namespace

Result<SnapshotIdentity> IdentifySnapshot(const RawFileSource& source) {
  SnapshotIdentity id{.file = source.identity()};
  const uint64_t pages = source.size() / kPage;
  if (pages == 0) return id;
  XXH3_state_t* state = XXH3_createState();
  if (state == nullptr) return Error(ErrorCode::kResourceExhausted, "snapshot identity: xxh3");
  XXH3_64bits_reset(state);
  std::vector<std::byte> page(kPage);
  for (uint64_t i = 0; i <= kSamplePages; ++i) {
    const uint64_t p = i == kSamplePages ? pages - 1 : pages * i / kSamplePages;
    Status read = source.ReadAt(FileOffset(p * kPage), page);
    if (!read) {
      XXH3_freeState(state);
      return std::move(read).error();
    }
    XXH3_64bits_update(state, &p, sizeof(p));
    XXH3_64bits_update(state, page.data(), page.size());
  }
  id.content_sample = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return id;
}

ZeroMap::ZeroMap(uint64_t page_count, std::vector<uint64_t> words)
    : page_count_(page_count), words_(std::move(words)) {
  for (uint64_t w : words_) zero_pages_ += static_cast<uint64_t>(std::popcount(w));
}

Result<std::shared_ptr<const ZeroMap>> ZeroMap::Scan(const RawFileSource& source) {
  const uint64_t pages = source.size() / kPage;
  std::vector<uint64_t> words((pages + 63) / 64, 0);
  auto mark = [&](uint64_t first, uint64_t count) {
    for (uint64_t p = first; p < first + count; ++p) words[p / 64] |= uint64_t{1} << (p % 64);
  };
  // Everything is a hole (zero) until a data extent says otherwise.
  mark(0, pages);
  std::vector<std::byte> buffer(kScanChunk);
  for (const Extent& extent : source.data_extents()) {
    const uint64_t first = extent.offset.value() / kPage;
    const uint64_t end =
        std::min(pages, (extent.offset.value() + extent.length + kPage - 1) / kPage);
    for (uint64_t p = first; p < end;) {
      const uint64_t n = std::min(end - p, kScanChunk / kPage);
      GM_RETURN_IF_ERROR(source.ReadAt(FileOffset(p * kPage), std::span(buffer).first(n * kPage)));
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t bit = uint64_t{1} << ((p + i) % 64);
        if (IsZeroPage(buffer.data() + i * kPage)) {
          words[(p + i) / 64] |= bit;
        } else {
          words[(p + i) / 64] &= ~bit;
        }
      }
      p += n;
    }
  }
  return std::shared_ptr<const ZeroMap>(new ZeroMap(pages, std::move(words)));
}

uint64_t ZeroMap::RunEnd(uint64_t page, uint64_t end) const {
  end = std::min(end, page_count_);
  if (page >= end) return end;
  const uint64_t flip = IsZero(page) ? ~uint64_t{0} : 0;  // xor: the bits that differ become 1
  uint64_t w = page / 64;
  uint64_t mask = ~uint64_t{0} << (page % 64);
  while (true) {
    const uint64_t differ = (words_[w] ^ flip) & mask;
    if (differ != 0) {
      return std::min(end, w * 64 + static_cast<uint64_t>(std::countr_zero(differ)));
    }
    if ((w + 1) * 64 >= end) return end;
    ++w;
    mask = ~uint64_t{0};
  }
}

std::string ZeroMap::Serialize(const SnapshotIdentity& identity) const {
  KeptWriter out(kMagic, kVersion);
  out.PutIdentity(identity);
  out.Put64(page_count_);
  for (uint64_t w : words_) out.Put64(w);
  return out.Finish();
}

Result<std::shared_ptr<const ZeroMap>> ZeroMap::Parse(std::span<const std::byte> bytes,
                                                      const SnapshotIdentity& expected) {
  GM_ASSIGN_OR_RETURN(KeptReader in, KeptReader::Open(bytes, kMagic, kVersion, "zero map"));
  SnapshotIdentity found;
  uint64_t pages = 0;
  if (!in.GetIdentity(&found) || !in.Get64(&pages)) return Corrupt("cut short");
  if (!(found == expected)) {
    return Error(ErrorCode::kFailedPrecondition, "zero map: made for another version of the file");
  }
  const uint64_t word_count = (pages + 63) / 64;
  if (pages != expected.file.size / kPage || in.left() != word_count * 8) {
    return Corrupt("its length does not match " + std::to_string(pages) + " pages");
  }
  std::vector<uint64_t> words(word_count);
  for (uint64_t& w : words) in.Get64(&w);
  return std::shared_ptr<const ZeroMap>(new ZeroMap(pages, std::move(words)));
}

}  // namespace guestmem
