#include "guestmem/disk_chunk_cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <vector>

#include "base/temp_dir.h"
#include "base/whole_file.h"

namespace guestmem {
namespace {

// A stored chunk of `pages` pages whose content is `seed` repeated, compressed with zstd.
struct Made {
  ChunkHash hash;
  StoredChunk stored;
};
Made MakeChunk(uint8_t seed, uint32_t pages = 4) {
  std::vector<std::byte> content(pages * 4096);
  for (size_t i = 0; i < content.size(); ++i) {
    content[i] = static_cast<std::byte>((i * 7 + seed * 13) % 251);
  }
  std::vector<std::byte> compressed;
  const Codec codec = CompressChunk(Codec::kZstd, 3, content, &compressed);
  return {HashChunk(content), StoredChunk{.codec = codec,
                                          .raw_bytes = static_cast<uint32_t>(content.size()),
                                          .compressed = std::move(compressed)}};
}

uint64_t EntryBytes(const Made& m) { return ChunkStore::kHeaderBytes + m.stored.compressed.size(); }

TEST(DiskChunkCacheTest, KeepsChunksByHashAndGivesThemBackWhole) {
  TempDir dir;
  auto cache = DiskChunkCache::Open(dir.File("chunks"), 1 << 20);
  ASSERT_TRUE(cache) << cache.error().ToString();
  const Made a = MakeChunk(1);
  EXPECT_EQ((*cache)->Get(a.hash, 1 << 20).error().code(), ErrorCode::kNotFound);
  ASSERT_TRUE((*cache)->Put(a.hash, a.stored));
  auto got = (*cache)->Get(a.hash, 1 << 20);
  ASSERT_TRUE(got) << got.error().ToString();
  EXPECT_EQ(got->compressed, a.stored.compressed);
  EXPECT_EQ(got->raw_bytes, a.stored.raw_bytes);
  EXPECT_EQ(got->codec, a.stored.codec);
  const DiskChunkCache::Counters c = (*cache)->counters();
  EXPECT_EQ(c.hits, 1u);
  EXPECT_EQ(c.misses, 1u);
  EXPECT_EQ(c.entries, 1u);
  EXPECT_EQ(c.bytes, EntryBytes(a));
}

TEST(DiskChunkCacheTest, DropsTheLeastRecentlyUsedBeyondItsBound) {
  TempDir dir;
  const Made a = MakeChunk(1), b = MakeChunk(2), c = MakeChunk(3);
  // Room for two of them.
  const uint64_t bound = EntryBytes(a) + EntryBytes(b) + EntryBytes(c) - 1;
  auto cache = DiskChunkCache::Open(dir.File("chunks"), bound);
  ASSERT_TRUE(cache);
  ASSERT_TRUE((*cache)->Put(a.hash, a.stored));
  ASSERT_TRUE((*cache)->Put(b.hash, b.stored));
  ASSERT_TRUE((*cache)->Get(a.hash, 1 << 20));  // a is now newer than b
  ASSERT_TRUE((*cache)->Put(c.hash, c.stored));
  EXPECT_TRUE((*cache)->Get(a.hash, 1 << 20));
  EXPECT_EQ((*cache)->Get(b.hash, 1 << 20).error().code(), ErrorCode::kNotFound);
  EXPECT_TRUE((*cache)->Get(c.hash, 1 << 20));
  EXPECT_FALSE(std::filesystem::exists(ChunkStore::Open(dir.File("chunks"), false)->PathOf(b.hash)))
      << "an evicted entry's file must go";
  EXPECT_EQ((*cache)->counters().evicted, 1u);
  EXPECT_LE((*cache)->counters().bytes, bound);
}

TEST(DiskChunkCacheTest, SurvivesARestartOldestFirstAndRemovesWhatACrashLeft) {
  TempDir dir;
  const std::string path = dir.File("chunks");
  const Made a = MakeChunk(1), b = MakeChunk(2), c = MakeChunk(3);
  {
    auto cache = DiskChunkCache::Open(path, 1 << 20);
    ASSERT_TRUE(cache);
    ASSERT_TRUE((*cache)->Put(a.hash, a.stored));
    ASSERT_TRUE((*cache)->Put(b.hash, b.stored));
  }
  auto store = ChunkStore::Open(path, false);
  ASSERT_TRUE(store);
  // a used longer ago than b; and a temporary file a crashed writer left an hour ago.
  const timespec old_a[2] = {{1000, 0}, {1000, 0}}, old_b[2] = {{2000, 0}, {2000, 0}};
  ASSERT_EQ(utimensat(AT_FDCWD, store->PathOf(a.hash).c_str(), old_a, 0), 0);
  ASSERT_EQ(utimensat(AT_FDCWD, store->PathOf(b.hash).c_str(), old_b, 0), 0);
  const std::string torn = store->PathOf(c.hash) + ".tmp.1.1";
  std::filesystem::create_directories(std::filesystem::path(torn).parent_path());
  { std::ofstream(torn) << "half a chunk"; }
  ASSERT_EQ(utimensat(AT_FDCWD, torn.c_str(), old_a, 0), 0);

  // Reopened with room for one: the older, a, goes.
  auto cache = DiskChunkCache::Open(path, EntryBytes(b) + 1);
  ASSERT_TRUE(cache);
  EXPECT_EQ((*cache)->counters().entries, 1u);
  EXPECT_EQ((*cache)->Get(a.hash, 1 << 20).error().code(), ErrorCode::kNotFound);
  EXPECT_TRUE((*cache)->Get(b.hash, 1 << 20));
  EXPECT_FALSE(std::filesystem::exists(torn));
}

TEST(DiskChunkCacheTest, ATornEntryIsDroppedAndForgetRemovesOne) {
  TempDir dir;
  const Made a = MakeChunk(1), b = MakeChunk(2);
  auto cache = DiskChunkCache::Open(dir.File("chunks"), 1 << 20);
  ASSERT_TRUE(cache);
  ASSERT_TRUE((*cache)->Put(a.hash, a.stored));
  ASSERT_TRUE((*cache)->Put(b.hash, b.stored));
  auto store = ChunkStore::Open(dir.File("chunks"), false);
  ASSERT_EQ(truncate(store->PathOf(a.hash).c_str(), 30), 0);  // torn by a crash
  EXPECT_EQ((*cache)->Get(a.hash, 1 << 20).error().code(), ErrorCode::kDataLoss);
  EXPECT_FALSE(std::filesystem::exists(store->PathOf(a.hash)));
  EXPECT_EQ((*cache)->Get(a.hash, 1 << 20).error().code(), ErrorCode::kNotFound);
  (*cache)->Forget(b.hash);
  EXPECT_EQ((*cache)->Get(b.hash, 1 << 20).error().code(), ErrorCode::kNotFound);
  EXPECT_EQ((*cache)->counters().forgotten, 2u);
  EXPECT_EQ((*cache)->counters().entries, 0u);
  EXPECT_EQ((*cache)->counters().bytes, 0u);
}

TEST(DiskChunkCacheTest, ABoundOfZeroIsRefused) {
  TempDir dir;
  auto cache = DiskChunkCache::Open(dir.File("chunks"), 0);
  ASSERT_FALSE(cache);
  EXPECT_EQ(cache.error().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace guestmem
