#include "snapshot_maker.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "base/fault_injection_os.h"
#include "base/temp_dir.h"
#include "guestmem/address.h"

namespace guestmem::cli {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kPage = kPageSize4K;

class SnapshotMakerTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.empty()); }

  std::vector<uint8_t> ReadAll(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }

  TempDir temp_;
  const std::string dir_ = temp_.path();
};

// What a page of a demo file looks like from its bytes alone.
SnapshotPageKind Classify(const uint8_t* page) {
  bool zero = true;
  bool printable = true;
  for (uint64_t i = 0; i < kPage; ++i) {
    zero = zero && page[i] == 0;
    printable = printable && ((page[i] >= 0x20 && page[i] < 0x7f) || page[i] == '\n');
  }
  if (zero) return SnapshotPageKind::kZero;
  return printable ? SnapshotPageKind::kText : SnapshotPageKind::kRandom;
}

TEST_F(SnapshotMakerTest, WritesTheMixItReports) {
  const std::string path = dir_ + "/demo.mem";
  auto made = MakeSnapshot(path, {.size_bytes = 64 * kMiB, .seed = 3});
  ASSERT_TRUE(made.has_value()) << made.error().ToString();
  EXPECT_EQ(made->size_bytes, 64 * kMiB);
  EXPECT_EQ(made->pages, 64 * kMiB / kPage);
  EXPECT_EQ(made->seed, 3u);
  EXPECT_EQ(made->zero_pages + made->text_pages + made->random_pages, made->pages);

  const std::vector<uint8_t> bytes = ReadAll(path);
  ASSERT_EQ(bytes.size(), 64 * kMiB);
  uint64_t counts[3] = {};
  for (uint64_t p = 0; p < made->pages; ++p) {
    ++counts[static_cast<int>(Classify(bytes.data() + p * kPage))];
  }
  EXPECT_EQ(counts[0], made->zero_pages);
  EXPECT_EQ(counts[1], made->text_pages);
  EXPECT_EQ(counts[2], made->random_pages);
  const double pages = static_cast<double>(made->pages);
  EXPECT_NEAR(static_cast<double>(made->zero_pages) / pages, 0.5, 0.05);
  EXPECT_NEAR(static_cast<double>(made->text_pages) / pages, 0.3, 0.05);
  EXPECT_NEAR(static_cast<double>(made->random_pages) / pages, 0.2, 0.05);

  // The content is what FillSnapshotPage says, page by page.
  std::vector<std::byte> page(kPage);
  for (uint64_t p = 0; p < made->pages; p += 97) {
    const SnapshotPageKind kind = Classify(bytes.data() + p * kPage);
    FillSnapshotPage(kind, 3, p, page);
    ASSERT_EQ(std::memcmp(page.data(), bytes.data() + p * kPage, kPage), 0) << "page " << p;
  }
}

TEST_F(SnapshotMakerTest, ZeroPagesAreWrittenAsZerosByDefault) {
  const std::string path = dir_ + "/demo.mem";
  auto made = MakeSnapshot(path, {.size_bytes = 16 * kMiB, .seed = 5});
  ASSERT_TRUE(made.has_value()) << made.error().ToString();
  EXPECT_GT(made->zero_pages, 0u);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  // No hole before the end: every page was written, zeros included.
  EXPECT_EQ(lseek(fd, 0, SEEK_HOLE), static_cast<off_t>(16 * kMiB));
  close(fd);
  const std::vector<uint8_t> bytes = ReadAll(path);
  uint64_t zero = 0;
  for (uint64_t p = 0; p < made->pages; ++p) {
    zero += Classify(bytes.data() + p * kPage) == SnapshotPageKind::kZero ? 1 : 0;
  }
  EXPECT_EQ(zero, made->zero_pages);
}

TEST_F(SnapshotMakerTest, ZeroPagesAreHolesAndOnlyDataIsAllocated) {
  const std::string path = dir_ + "/demo.mem";
  auto made = MakeSnapshot(path, {.size_bytes = 16 * kMiB, .seed = 5, .holes = true});
  ASSERT_TRUE(made.has_value()) << made.error().ToString();
  const std::vector<uint8_t> bytes = ReadAll(path);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  // Walk the data extents the file system reports.
  std::vector<bool> in_data(made->pages, false);
  off_t at = 0;
  while (true) {
    const off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0) {
      ASSERT_EQ(errno, ENXIO);
      break;
    }
    const off_t hole = lseek(fd, data, SEEK_HOLE);
    ASSERT_GT(hole, data);
    for (off_t p = data / static_cast<off_t>(kPage); p * static_cast<off_t>(kPage) < hole; ++p) {
      in_data[static_cast<size_t>(p)] = true;
    }
    at = hole;
  }
  struct stat st {};
  ASSERT_EQ(fstat(fd, &st), 0);
  close(fd);
  ASSERT_GT(made->zero_pages, 0u);
  if (std::count(in_data.begin(), in_data.end(), true) == static_cast<ptrdiff_t>(made->pages)) {
    GTEST_SKIP() << "this file system does not report holes";
  }
  uint64_t data_pages = 0;
  for (uint64_t p = 0; p < made->pages; ++p) {
    const bool zero = Classify(bytes.data() + p * kPage) == SnapshotPageKind::kZero;
    EXPECT_NE(zero, in_data[p]) << "page " << p << (zero ? " is zero but allocated" : " is a hole");
    data_pages += !zero;
  }
  // Blocks allocated: the data pages (plus a little file-system metadata), not the holes.
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, data_pages * kPage + 64 * 1024);
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, data_pages * kPage);
}

TEST_F(SnapshotMakerTest, SameSeedSameBytesOtherSeedOtherBytes) {
  ASSERT_TRUE(MakeSnapshot(dir_ + "/a", {.size_bytes = 4 * kMiB, .seed = 1}));
  ASSERT_TRUE(MakeSnapshot(dir_ + "/b", {.size_bytes = 4 * kMiB, .seed = 1}));
  ASSERT_TRUE(MakeSnapshot(dir_ + "/c", {.size_bytes = 4 * kMiB, .seed = 2}));
  EXPECT_EQ(ReadAll(dir_ + "/a"), ReadAll(dir_ + "/b"));
  EXPECT_NE(ReadAll(dir_ + "/a"), ReadAll(dir_ + "/c"));
}

TEST_F(SnapshotMakerTest, TextPagesDifferFromEachOther) {
  std::vector<std::byte> a(kPage), b(kPage);
  FillSnapshotPage(SnapshotPageKind::kText, 1, 10, a);
  FillSnapshotPage(SnapshotPageKind::kText, 1, 11, b);
  EXPECT_NE(a, b);
  FillSnapshotPage(SnapshotPageKind::kRandom, 1, 10, b);
  EXPECT_NE(a, b);
}

TEST_F(SnapshotMakerTest, FractionsAreHonoured) {
  auto all_random = MakeSnapshot(
      dir_ + "/r",
      {.size_bytes = kMiB, .zero_fraction = 0, .text_fraction = 0, .random_fraction = 1});
  ASSERT_TRUE(all_random.has_value());
  EXPECT_EQ(all_random->random_pages, kMiB / kPage);
  auto all_zero = MakeSnapshot(dir_ + "/z", {.size_bytes = kMiB,
                                             .zero_fraction = 1,
                                             .text_fraction = 0,
                                             .random_fraction = 0,
                                             .holes = true});
  ASSERT_TRUE(all_zero.has_value());
  EXPECT_EQ(all_zero->zero_pages, kMiB / kPage);
  struct stat st {};
  ASSERT_EQ(stat((dir_ + "/z").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kMiB);
  EXPECT_EQ(st.st_blocks, 0);  // all holes
}

TEST_F(SnapshotMakerTest, BadOptionsAreRefusedAndCreateNothing) {
  struct Case {
    const char* name;
    SnapshotMakerOptions options;
    const char* fragment;
  };
  const Case cases[] = {
      {"zero size", {.size_bytes = 0}, "size 0x0"},
      {"unaligned", {.size_bytes = 5000}, "size 0x1388 is not a non-zero multiple of 4096"},
      {"sum", {.size_bytes = kMiB, .zero_fraction = 0.5, .text_fraction = 0.5}, "add up to 1.2"},
      {"negative",
       {.size_bytes = kMiB, .zero_fraction = -0.5, .text_fraction = 1.3, .random_fraction = 0.2},
       "negative"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto made = MakeSnapshot(dir_ + "/never", c.options);
    ASSERT_FALSE(made.has_value());
    EXPECT_EQ(made.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(made.error().context().find(c.fragment), std::string::npos)
        << made.error().ToString();
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/never"));
  }
}

TEST_F(SnapshotMakerTest, ExistingFileIsKeptUnlessOverwriteIsAsked) {
  const std::string path = dir_ + "/precious";
  std::ofstream(path) << "keep me";
  auto refused = MakeSnapshot(path, {.size_bytes = kMiB});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kAlreadyExists);
  EXPECT_NE(refused.error().context().find(path), std::string::npos);
  const std::vector<uint8_t> kept = ReadAll(path);
  EXPECT_EQ(std::string(kept.begin(), kept.end()), "keep me");

  auto replaced = MakeSnapshot(path, {.size_bytes = kMiB, .overwrite = true});
  ASSERT_TRUE(replaced.has_value()) << replaced.error().ToString();
  EXPECT_EQ(std::filesystem::file_size(path), kMiB);
}

TEST_F(SnapshotMakerTest, FailedWritesNameTheOffset) {
  FaultInjectionOs os;
  os.FailNext(FaultInjectionOs::Call::kPwrite, ENOSPC, 1, 1);
  auto made = MakeSnapshot(dir_ + "/full", {.size_bytes = 8 * kMiB, .os = &os});
  ASSERT_FALSE(made.has_value());
  EXPECT_EQ(made.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(made.error().sys_errno(), ENOSPC);
  EXPECT_NE(made.error().context().find("pwrite " + dir_ + "/full at 0x"), std::string::npos)
      << made.error().ToString();

  os.FailNext(FaultInjectionOs::Call::kFtruncate, EFBIG);
  auto too_big = MakeSnapshot(dir_ + "/big", {.size_bytes = 8 * kMiB, .os = &os});
  ASSERT_FALSE(too_big.has_value());
  EXPECT_NE(too_big.error().context().find("ftruncate"), std::string::npos);
}

}  // namespace
}  // namespace guestmem::cli
