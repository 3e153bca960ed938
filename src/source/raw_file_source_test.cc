#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "base/fault_injection_os.h"
#include "guestmem/page_source.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;

class RawFileSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/guestmem-source-XXXXXX";
    dir_ = mkdtemp(dir);
    path_ = dir_ + "/mem";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A file of `pages` pages where only `data_pages` are written (page i filled with i+1).
  void Write(uint64_t pages, const std::vector<uint64_t>& data_pages) {
    int fd = open(path_.c_str(), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(pages * kPage)), 0);
    for (uint64_t p : data_pages) {
      std::vector<uint8_t> buf(kPage, static_cast<uint8_t>(p + 1));
      ASSERT_EQ(pwrite(fd, buf.data(), kPage, static_cast<off_t>(p * kPage)),
                static_cast<ssize_t>(kPage));
    }
    close(fd);
  }

  std::string dir_;
  std::string path_;
};

TEST_F(RawFileSourceTest, FindsHolesAtStartMiddleAndEnd) {
  // Holes: [0,4) [6,10) [12,16); data: [4,6) [10,12).
  Write(16, {4, 5, 10, 11});
  auto source = RawFileSource::Open(path_);
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  EXPECT_EQ((*source)->size(), 16 * kPage);
  ASSERT_EQ((*source)->data_extents().size(), 2u);
  EXPECT_EQ((*source)->hole_bytes(), 12 * kPage);

  auto expect = [&](uint64_t at, uint64_t length, ExtentKind kind) {
    auto e = (*source)->ExtentAt(FileOffset(at));
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->offset.value(), at);
    EXPECT_EQ(e->length, length) << "at " << at;
    EXPECT_EQ(e->kind, kind) << "at " << at;
  };
  expect(0, 4 * kPage, ExtentKind::kZero);
  expect(kPage, 3 * kPage, ExtentKind::kZero);
  expect(4 * kPage, 2 * kPage, ExtentKind::kData);
  expect(5 * kPage + 10, kPage - 10, ExtentKind::kData);
  expect(6 * kPage, 4 * kPage, ExtentKind::kZero);
  expect(10 * kPage, 2 * kPage, ExtentKind::kData);
  expect(12 * kPage, 4 * kPage, ExtentKind::kZero);
  expect(16 * kPage - 1, 1, ExtentKind::kZero);
  EXPECT_EQ((*source)->ExtentAt(FileOffset(16 * kPage)).error().code(), ErrorCode::kOutOfRange);
}

TEST_F(RawFileSourceTest, ReadsBytesAndZeroHoles) {
  Write(8, {1, 6});
  auto source = RawFileSource::Open(path_);
  ASSERT_TRUE(source.has_value());
  std::vector<std::byte> buf(8 * kPage);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(0), buf));
  for (uint64_t p = 0; p < 8; ++p) {
    const auto want = static_cast<std::byte>(p == 1 || p == 6 ? p + 1 : 0);
    for (uint64_t i = 0; i < kPage; i += 511) ASSERT_EQ(buf[p * kPage + i], want) << p;
  }
}

TEST_F(RawFileSourceTest, ReadPastEndAndTruncationAreErrors) {
  Write(4, {0, 1, 2, 3});
  auto source = RawFileSource::Open(path_);
  ASSERT_TRUE(source.has_value());
  std::vector<std::byte> buf(2 * kPage);
  EXPECT_EQ((*source)->ReadAt(FileOffset(3 * kPage), buf).error().code(), ErrorCode::kOutOfRange);
  EXPECT_EQ((*source)->ReadAt(FileOffset(UINT64_MAX - 10), buf).error().code(),
            ErrorCode::kOutOfRange);
  // The file shrinks under us: the promised bytes are gone.
  ASSERT_EQ(truncate(path_.c_str(), static_cast<off_t>(kPage + 100)), 0);
  Status read = (*source)->ReadAt(FileOffset(kPage), buf);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kDataLoss);
  EXPECT_NE(read.error().context().find("truncated"), std::string::npos);
}

TEST_F(RawFileSourceTest, IoErrorsAreReported) {
  Write(4, {0, 1, 2, 3});
  FaultInjectionOs os;
  auto source = RawFileSource::Open(path_, &os);
  ASSERT_TRUE(source.has_value());
  os.FailNext(FaultInjectionOs::Call::kPread, EIO);
  std::vector<std::byte> buf(kPage);
  Status read = (*source)->ReadAt(FileOffset(0), buf);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kIoError);
  EXPECT_EQ(read.error().sys_errno(), EIO);
  EXPECT_TRUE((*source)->ReadAt(FileOffset(0), buf));  // transient
}

TEST_F(RawFileSourceTest, OpenErrors) {
  EXPECT_EQ(RawFileSource::Open(dir_ + "/missing").error().code(), ErrorCode::kNotFound);
  EXPECT_EQ(RawFileSource::Open(dir_).error().code(), ErrorCode::kInvalidArgument);
}

TEST_F(RawFileSourceTest, ConcurrentReads) {
  std::vector<uint64_t> all;
  for (uint64_t p = 0; p < 256; p += 2) all.push_back(p);
  Write(256, all);
  auto source = RawFileSource::Open(path_);
  ASSERT_TRUE(source.has_value());
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> buf(kPage);
      for (uint64_t p = static_cast<uint64_t>(t); p < 256; p += 4) {
        if (!(*source)->ReadAt(FileOffset(p * kPage), buf)) ++bad;
        const auto want = static_cast<std::byte>(p % 2 == 0 ? p + 1 : 0);
        if (buf[123] != want) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

}  // namespace
}  // namespace guestmem
