// Packed snapshots end to end in the library: pack, read back page by page, layers, a shared
// store, corruption found and confined to the pages it touches.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "base/temp_dir.h"
#include "base/whole_file.h"
#include "guestmem/chunk_cache.h"
#include "guestmem/chunk_codec.h"
#include "guestmem/packed_index.h"
#include "guestmem/packed_source.h"
#include "guestmem/snapshot_packer.h"
#include "testutil/error_code.h"

namespace guestmem {
namespace {

using testutil::Describe;
using testutil::ErrorCodeOf;

constexpr uint64_t kPage = 4096;

enum class Fill { kHole, kZeros, kText, kRandom };

// A raw memory file of `fills.size()` pages, each filled as its entry says (seeded by `seed`
// and the page, so that two files agree on a page exactly when its fill and seed agree).
std::vector<std::byte> PageContent(Fill fill, uint64_t page, uint64_t seed) {
  std::vector<std::byte> out(kPage);
  if (fill == Fill::kText) {
    static const char kWords[] = "guest memory restored lazily from a snapshot page ";
    for (uint64_t i = 0; i < kPage; ++i) {
      out[i] = static_cast<std::byte>(kWords[(i + page * 7 + seed) % (sizeof(kWords) - 1)]);
    }
    out[0] = static_cast<std::byte>(page & 0xff);
    out[1] = static_cast<std::byte>(seed & 0xff);
  } else if (fill == Fill::kRandom) {
    std::mt19937_64 rng(page * 1000003 + seed);
    for (uint64_t i = 0; i < kPage; i += 8) {
      const uint64_t v = rng();
      std::memcpy(out.data() + i, &v, 8);
    }
  }
  return out;
}

void WriteRaw(const std::string& path, const std::vector<Fill>& fills,
              const std::vector<uint64_t>& seeds) {
  const int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(fills.size() * kPage)), 0);
  for (uint64_t p = 0; p < fills.size(); ++p) {
    if (fills[p] == Fill::kHole) continue;
    const auto content = PageContent(fills[p], p, seeds[p]);
    ASSERT_EQ(pwrite(fd, content.data(), kPage, static_cast<off_t>(p * kPage)),
              static_cast<ssize_t>(kPage));
  }
  close(fd);
}

std::vector<Fill> MixedFills(uint64_t pages, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Fill> fills(pages);
  for (Fill& f : fills) f = static_cast<Fill>(rng() % 4);
  return fills;
}

// Every page of `source` compared with the raw file at `raw_path`.
void ExpectSameContent(const PageSource& source, const std::string& raw_path) {
  auto raw = RawFileSource::Open(raw_path);
  ASSERT_TRUE(raw) << Describe(raw);
  ASSERT_EQ(source.size(), (*raw)->size());
  std::vector<std::byte> a(kPage), b(kPage);
  for (uint64_t p = 0; p < source.size() / kPage; ++p) {
    ASSERT_TRUE(source.ReadAt(FileOffset(p * kPage), a)) << "page " << p;
    ASSERT_TRUE((*raw)->ReadAt(FileOffset(p * kPage), b));
    ASSERT_EQ(a, b) << "page " << p << " differs";
  }
}

Result<PackSummary> Pack(const std::string& raw, const std::string& out, PackOptions options) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> source, RawFileSource::Open(raw));
  return PackSnapshot(*source, out, options);
}

TEST(ChunkCodecTest, EveryCodecRoundTripsAndRefusesGarbage) {
  std::vector<std::byte> raw = PageContent(Fill::kText, 3, 1);
  for (Codec codec : {Codec::kNone, Codec::kLz4, Codec::kZstd}) {
    std::vector<std::byte> packed;
    const Codec used = CompressChunk(codec, 3, raw, &packed);
    EXPECT_EQ(used, codec) << CodecName(codec);  // text compresses
    std::vector<std::byte> back(raw.size());
    ASSERT_TRUE(DecompressChunk(used, packed, back));
    EXPECT_EQ(back, raw);
    if (used != Codec::kNone) {
      std::vector<std::byte> garbage(packed.size(), std::byte{0xff});
      EXPECT_EQ(ErrorCodeOf(DecompressChunk(used, garbage, back)), ErrorCode::kDataLoss);
    }
  }
  std::vector<std::byte> noise = PageContent(Fill::kRandom, 1, 1), packed;
  EXPECT_EQ(CompressChunk(Codec::kZstd, 3, noise, &packed), Codec::kNone);
  EXPECT_EQ(packed, noise);
  EXPECT_NE(HashChunk(raw), HashChunk(noise));
}

TEST(ChunkCacheTest, LoadsAChunkOnceHoweverManyAskAndStaysWithinItsCapacity) {
  ChunkCache cache(8 * kPage);
  std::atomic<int> loads{0};
  ChunkHash hash{};
  hash[0] = 1;
  auto loader = [&] {
    loads.fetch_add(1);
    std::this_thread::yield();
    return Result<ChunkCache::Chunk>(std::make_shared<DecodedChunk>(4 * kPage));
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] { ASSERT_TRUE(cache.Get(hash, loader)); });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(loads.load(), 1);
  for (uint8_t i = 2; i < 10; ++i) {
    ChunkHash other{};
    other[0] = i;
    ASSERT_TRUE(cache.Get(other, loader));
    EXPECT_LE(cache.bytes(), cache.capacity());
  }
  EXPECT_FALSE(cache.Contains(hash));  // the least recently used went first
  auto failing = [] { return Result<ChunkCache::Chunk>(Error(ErrorCode::kIoError, "no")); };
  ChunkHash bad{};
  bad[0] = 99;
  EXPECT_EQ(ErrorCodeOf(cache.Get(bad, failing)), ErrorCode::kIoError);
  EXPECT_FALSE(cache.Contains(bad));  // a failure is not kept
}

class PackedSnapshotTest : public ::testing::TestWithParam<Codec> {
 protected:
  TempDir dir_;
};

TEST_P(PackedSnapshotTest, RoundTripsAFullSnapshotPageByPage) {
  const std::string raw = dir_.File("full.mem"), packed = dir_.File("full.gmp");
  const auto fills = MixedFills(300, 7);
  WriteRaw(raw, fills, std::vector<uint64_t>(fills.size(), 1));
  auto summary = Pack(raw, packed, PackOptions{.codec = GetParam(), .chunk_pages = 16});
  ASSERT_TRUE(summary) << Describe(summary);
  const uint64_t zero = std::count_if(fills.begin(), fills.end(), [](Fill f) {
    return f == Fill::kHole || f == Fill::kZeros;
  });
  EXPECT_EQ(summary->zero_pages, zero);
  EXPECT_EQ(summary->stored_pages, fills.size() - zero);
  auto source = PackedSource::Open(packed);
  ASSERT_TRUE(source) << Describe(source);
  ExpectSameContent(**source, raw);
  // Zero pages are known as zero without reading anything.
  for (uint64_t p = 0; p < fills.size(); ++p) {
    auto extent = (*source)->ExtentAt(FileOffset(p * kPage));
    ASSERT_TRUE(extent);
    const bool zero_page = fills[p] == Fill::kHole || fills[p] == Fill::kZeros;
    EXPECT_EQ(extent->kind == ExtentKind::kZero, zero_page) << "page " << p;
  }
  // Unpacked, it is the same bytes.
  ASSERT_TRUE(UnpackSnapshot(**source, dir_.File("back.mem")));
  auto a = ReadWholeFile(raw), b = ReadWholeFile(dir_.File("back.mem"));
  ASSERT_TRUE(a && b);
  EXPECT_TRUE(*a == *b);
  // A reader of a range that crosses runs and chunks gets it whole.
  std::vector<std::byte> range(37 * kPage + 100);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(5 * kPage + 17), range));
  std::vector<std::byte> expected(range.size());
  ASSERT_TRUE((*RawFileSource::Open(raw))->ReadAt(FileOffset(5 * kPage + 17), expected));
  EXPECT_EQ(range, expected);
}

INSTANTIATE_TEST_SUITE_P(Codecs, PackedSnapshotTest,
                         ::testing::Values(Codec::kNone, Codec::kLz4, Codec::kZstd),
                         [](const auto& param_info) { return std::string(CodecName(param_info.param)); });

TEST(PackedLayerTest, ADiffSnapshotOverItsBaseStoresOnlyTheChangedPages) {
  TempDir dir;
  const uint64_t pages = 256;
  auto fills = MixedFills(pages, 3);
  for (Fill& f : fills) f = f == Fill::kHole ? Fill::kText : f;
  std::vector<uint64_t> seeds(pages, 1);
  WriteRaw(dir.File("base.mem"), fills, seeds);
  ASSERT_TRUE(Pack(dir.File("base.mem"), dir.File("base.gmp"), {.chunk_pages = 16}));

  // Firecracker's diff snapshot: the dirtied pages written, every other page a hole.
  std::vector<Fill> diff(pages, Fill::kHole), full = fills;
  std::vector<uint64_t> diff_seeds(pages, 1), full_seeds = seeds;
  uint64_t changed = 0;
  for (uint64_t p = 3; p < pages; p += 11) {
    diff[p] = full[p] = p % 2 == 0 ? Fill::kRandom : Fill::kZeros;
    diff_seeds[p] = full_seeds[p] = 2;
    ++changed;
  }
  WriteRaw(dir.File("diff.mem"), diff, diff_seeds);
  WriteRaw(dir.File("merged.mem"), full, full_seeds);
  auto summary = Pack(dir.File("diff.mem"), dir.File("layer.gmp"),
                      {.chunk_pages = 16, .parent_path = dir.File("base.gmp")});
  ASSERT_TRUE(summary) << Describe(summary);
  EXPECT_LE(summary->stored_pages, changed);  // only what changed (zeros stored as zero runs)
  EXPECT_EQ(summary->parent_pages + summary->zero_pages + summary->stored_pages, pages);

  auto layer = PackedSource::Open(dir.File("layer.gmp"));
  ASSERT_TRUE(layer) << Describe(layer);
  EXPECT_EQ((*layer)->layers(), 2);
  ExpectSameContent(**layer, dir.File("merged.mem"));

  // A third layer over the second; the chain reads as its merge.
  std::vector<Fill> third(pages, Fill::kHole);
  std::vector<uint64_t> third_seeds(pages, 1);
  for (uint64_t p = 0; p < pages; p += 17) {
    third[p] = full[p] = Fill::kRandom;
    third_seeds[p] = full_seeds[p] = 3;
  }
  WriteRaw(dir.File("third.mem"), third, third_seeds);
  WriteRaw(dir.File("merged3.mem"), full, full_seeds);
  ASSERT_TRUE(Pack(dir.File("third.mem"), dir.File("third.gmp"),
                   {.chunk_pages = 16, .parent_path = dir.File("layer.gmp")}));
  auto chain = PackedSource::Open(dir.File("third.gmp"));
  ASSERT_TRUE(chain) << Describe(chain);
  EXPECT_EQ((*chain)->layers(), 3);
  ExpectSameContent(**chain, dir.File("merged3.mem"));

  // Moved together, the chain still opens (parents are named relative to their child).
  std::filesystem::create_directory(dir.File("moved"));
  for (const char* name : {"base.gmp", "layer.gmp", "third.gmp"}) {
    std::filesystem::rename(dir.File(name), dir.File(std::string("moved/") + name));
  }
  auto moved = PackedSource::Open(dir.File("moved/third.gmp"));
  ASSERT_TRUE(moved) << Describe(moved);
  ExpectSameContent(**moved, dir.File("merged3.mem"));

  // A parent replaced by another snapshot is refused, not read through.
  ASSERT_TRUE(Pack(dir.File("merged.mem"), dir.File("moved/base.gmp"), {.chunk_pages = 16}));
  EXPECT_EQ(ErrorCodeOf(PackedSource::Open(dir.File("moved/third.gmp"))),
            ErrorCode::kFailedPrecondition);
}

TEST(ChunkStoreTest, SnapshotsInOneStoreShareTheirCommonChunks) {
  TempDir dir;
  const uint64_t pages = 512;
  auto fills = MixedFills(pages, 11);
  std::vector<uint64_t> seeds(pages, 1);
  WriteRaw(dir.File("a.mem"), fills, seeds);
  for (uint64_t p = 0; p < 16; ++p) {  // the first chunk's pages differ; the rest is the same
    fills[p] = Fill::kRandom;
    seeds[p] = 9;
  }
  WriteRaw(dir.File("b.mem"), fills, seeds);
  PackOptions options{.chunk_pages = 16, .store_directory = dir.File("store")};
  auto a = Pack(dir.File("a.mem"), dir.File("a.gmp"), options);
  auto b = Pack(dir.File("b.mem"), dir.File("b.gmp"), options);
  ASSERT_TRUE(a && b) << Describe(a) << Describe(b);
  EXPECT_EQ(a->chunks_shared, 0u);
  EXPECT_GE(b->chunks_shared + 2, b->chunks);  // all but the chunks the change shifted
  EXPECT_LT(b->compressed_bytes, a->compressed_bytes / 4);
  for (const char* name : {"a", "b"}) {
    auto source = PackedSource::Open(dir.File(std::string(name) + ".gmp"));
    ASSERT_TRUE(source) << Describe(source);
    ExpectSameContent(**source, dir.File(std::string(name) + ".mem"));
  }
}

TEST(PackedCorruptionTest, ACorruptChunkFailsOnlyThePagesItHolds) {
  TempDir dir;
  const uint64_t pages = 128;
  std::vector<Fill> fills(pages, Fill::kText);
  WriteRaw(dir.File("s.mem"), fills, std::vector<uint64_t>(pages, 1));
  ASSERT_TRUE(Pack(dir.File("s.mem"), dir.File("s.gmp"), {.chunk_pages = 16}));
  auto index_of = PackedSource::Open(dir.File("s.gmp"));
  ASSERT_TRUE(index_of);
  const ChunkRef chunk = (*index_of)->index().chunks[2];  // pages 32..47
  index_of->reset();
  {
    const int fd = open(dir.File("s.gmp").c_str(), O_RDWR);
    char b = 0;
    ASSERT_EQ(pread(fd, &b, 1, static_cast<off_t>(chunk.offset + chunk.compressed_bytes / 2)), 1);
    b = static_cast<char>(b ^ 0x20);
    ASSERT_EQ(pwrite(fd, &b, 1, static_cast<off_t>(chunk.offset + chunk.compressed_bytes / 2)), 1);
    close(fd);
  }
  auto source = PackedSource::Open(dir.File("s.gmp"));
  ASSERT_TRUE(source) << Describe(source);
  std::vector<std::byte> page(kPage);
  for (uint64_t p = 0; p < pages; ++p) {
    const Status read = (*source)->ReadAt(FileOffset(p * kPage), page);
    if (p >= 32 && p < 48) {
      ASSERT_EQ(ErrorCodeOf(read), ErrorCode::kDataLoss) << "page " << p;
      EXPECT_NE(read.error().context().find("chunk 2"), std::string::npos) << read.error().ToString();
      EXPECT_FALSE(IsRetryable(read.error().code()));
    } else {
      ASSERT_TRUE(read) << "page " << p << ": " << read.error().ToString();
      EXPECT_EQ(page, PageContent(Fill::kText, p, 1));
    }
  }
  const auto bad = VerifySnapshot(**source);
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(bad[0].chunk, 2u);
  EXPECT_NE(bad[0].why.context().find("pages 32-47"), std::string::npos) << bad[0].why.ToString();
}

TEST(PackedCorruptionTest, EverySingleByteCorruptionIsFound) {
  TempDir dir;
  const uint64_t pages = 96;
  WriteRaw(dir.File("s.mem"), MixedFills(pages, 5), std::vector<uint64_t>(pages, 1));
  for (Codec codec : {Codec::kLz4, Codec::kZstd}) {
    ASSERT_TRUE(Pack(dir.File("s.mem"), dir.File("s.gmp"), {.codec = codec, .chunk_pages = 16}));
    auto good = ReadWholeFile(dir.File("s.gmp"));
    ASSERT_TRUE(good);
    std::mt19937_64 rng(static_cast<uint64_t>(codec));
    for (int trial = 0; trial < 150; ++trial) {
      std::vector<std::byte> bytes = *good;
      const size_t at = rng() % bytes.size();
      bytes[at] ^= static_cast<std::byte>(1 + rng() % 255);
      ASSERT_TRUE(WriteFileAtomically(dir.File("bad.gmp"), bytes, Durability::kUnsynced, "test"));
      auto source = PackedSource::Open(dir.File("bad.gmp"));
      if (!source) {
        EXPECT_EQ(source.error().code(), ErrorCode::kDataLoss) << source.error().ToString();
        continue;  // found at open: header or index
      }
      EXPECT_FALSE(VerifySnapshot(**source).empty())
          << CodecName(codec) << ": byte " << at << " of " << bytes.size() << " changed unnoticed";
    }
  }
}

TEST(PackedIndexTest, RefusesFilesThatAreNotWholeSnapshots) {
  TempDir dir;
  WriteRaw(dir.File("s.mem"), MixedFills(64, 2), std::vector<uint64_t>(64, 1));
  ASSERT_TRUE(Pack(dir.File("s.mem"), dir.File("s.gmp"), {.chunk_pages = 16}));
  auto bytes = ReadWholeFile(dir.File("s.gmp"));
  ASSERT_TRUE(bytes);
  for (size_t keep : {size_t{0}, size_t{7}, size_t{100}, size_t{128}, bytes->size() - 1}) {
    std::vector<std::byte> cut(bytes->begin(), bytes->begin() + static_cast<std::ptrdiff_t>(keep));
    ASSERT_TRUE(WriteFileAtomically(dir.File("cut.gmp"), cut, Durability::kUnsynced, "test"));
    auto opened = PackedSource::Open(dir.File("cut.gmp"));
    EXPECT_EQ(ErrorCodeOf(opened), ErrorCode::kDataLoss) << keep << " bytes: " << Describe(opened);
  }
  // A raw file is told apart by its magic.
  auto any = OpenAnySnapshot(dir.File("s.mem"));
  ASSERT_TRUE(any);
  EXPECT_NE(dynamic_cast<RawFileSource*>(any->get()), nullptr);
  auto packed = OpenAnySnapshot(dir.File("s.gmp"));
  ASSERT_TRUE(packed);
  EXPECT_NE(dynamic_cast<PackedSource*>(packed->get()), nullptr);
}

TEST(PackedSourceTest, AHeldViewOutlivesItsChunkInTheCache) {
  TempDir dir;
  const uint64_t pages = 64;
  std::vector<Fill> fills(pages, Fill::kText);
  WriteRaw(dir.File("s.mem"), fills, std::vector<uint64_t>(pages, 1));
  ASSERT_TRUE(Pack(dir.File("s.mem"), dir.File("s.gmp"), {.chunk_pages = 16}));
  // A cache of one chunk: reading another evicts the first.
  auto source = PackedSource::Open(dir.File("s.gmp"), {.cache_bytes = 16 * kPage});
  ASSERT_TRUE(source) << Describe(source);
  auto held = (*source)->HoldView(FileOffset(2 * kPage), 3 * kPage);
  ASSERT_TRUE(held) << Describe(held);
  ASSERT_EQ(held->bytes.size(), 3 * kPage);
  std::vector<std::byte> other(kPage);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(40 * kPage), other));
  EXPECT_FALSE((*source)->cache()->Contains((*source)->index().chunks[0].hash));
  for (uint64_t p = 0; p < 3; ++p) {
    const auto expected = PageContent(Fill::kText, 2 + p, 1);
    EXPECT_TRUE(std::equal(expected.begin(), expected.end(), held->bytes.begin() + p * kPage))
        << "page " << 2 + p;
  }
  // A range across two chunks has no view (the fetcher reads it instead); nor has a zero run.
  auto across = (*source)->HoldView(FileOffset(14 * kPage), 4 * kPage);
  ASSERT_TRUE(across);
  EXPECT_TRUE(across->bytes.empty());
}

TEST(SnapshotDiffTest, FindsExactlyThePagesThatDiffer) {
  TempDir dir;
  const uint64_t pages = 200;
  auto fills = MixedFills(pages, 4);
  std::vector<uint64_t> seeds(pages, 1);
  WriteRaw(dir.File("a.mem"), fills, seeds);
  for (uint64_t p : {5, 6, 7, 100, 199}) {
    fills[p] = Fill::kRandom;
    seeds[p] = 8;
  }
  WriteRaw(dir.File("b.mem"), fills, seeds);
  ASSERT_TRUE(Pack(dir.File("b.mem"), dir.File("b.gmp"), {.chunk_pages = 16}));
  auto a = RawFileSource::Open(dir.File("a.mem"));
  auto b = PackedSource::Open(dir.File("b.gmp"));
  ASSERT_TRUE(a && b);
  auto diff = DiffSnapshots(**a, **b);
  ASSERT_TRUE(diff) << Describe(diff);
  EXPECT_EQ(diff->differing_pages, 5u);
  ASSERT_EQ(diff->runs.size(), 3u);
  EXPECT_EQ(diff->runs[0], (PageRun{.first_page = 5, .pages = 3}));
  auto same = DiffSnapshots(**a, **a);
  ASSERT_TRUE(same);
  EXPECT_EQ(same->differing_pages, 0u);
}

}  // namespace
}  // namespace guestmem
