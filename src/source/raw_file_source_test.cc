#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "base/fault_injection_os.h"
#include "guestmem/page_source.h"
#include "guestmem/unique_fd.h"
#include "testutil/error_code.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;

class RawFileSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = std::filesystem::temp_directory_path() / "guestmem-source-XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/snapshot.mem";
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
  EXPECT_EQ(testutil::ErrorCodeOf((*source)->ExtentAt(FileOffset(16 * kPage))),
            ErrorCode::kOutOfRange);
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
  std::vector<std::byte> buf(2 * kPage, std::byte{0xee});
  Status past = (*source)->ReadAt(FileOffset(3 * kPage), buf);
  ASSERT_FALSE(past.has_value());
  EXPECT_EQ(past.error().code(), ErrorCode::kOutOfRange);
  EXPECT_NE(past.error().context().find("read of 0x2000 bytes at 0x3000"), std::string::npos)
      << past.error().ToString();
  EXPECT_EQ(buf[0], std::byte{0xee});  // nothing was written
  Status overflowing = (*source)->ReadAt(FileOffset(UINT64_MAX - 10), buf);
  ASSERT_FALSE(overflowing.has_value());
  EXPECT_EQ(overflowing.error().code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(buf[0], std::byte{0xee});
  // Up to the last byte is fine.
  ASSERT_TRUE((*source)->ReadAt(FileOffset(2 * kPage), buf));
  EXPECT_EQ(buf[2 * kPage - 1], std::byte{4});
  // The file shrinks under us: the promised bytes are gone.
  ASSERT_EQ(truncate(path_.c_str(), static_cast<off_t>(kPage + 100)), 0);
  Status read = (*source)->ReadAt(FileOffset(kPage), buf);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kDataLoss);
  EXPECT_NE(read.error().context().find("snapshot.mem truncated: expected 0x2000 bytes at 0x1000"),
            std::string::npos)
      << read.error().ToString();
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
  EXPECT_EQ(buf[0], std::byte{1});
}

// Returns at most 100 bytes per pread, as a slow or network file system may.
class ShortReadOs : public OsWrapper {
 public:
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    ++calls;
    return OsWrapper::Pread(fd, buf, std::min<size_t>(count, 100), offset);
  }
  std::atomic<int> calls{0};
};

TEST_F(RawFileSourceTest, ShortReadsAreRetried) {
  Write(2, {0, 1});
  ShortReadOs os;
  auto source = RawFileSource::Open(path_, &os);
  ASSERT_TRUE(source.has_value());
  std::vector<std::byte> buf(2 * kPage);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(0), buf));
  EXPECT_EQ(os.calls.load(), static_cast<int>((2 * kPage + 99) / 100));
  EXPECT_EQ(buf[kPage - 1], std::byte{1});
  EXPECT_EQ(buf[kPage], std::byte{2});
  EXPECT_EQ(buf[2 * kPage - 1], std::byte{2});
}

TEST_F(RawFileSourceTest, HolesAreMappedOnceAtOpen) {
  Write(64, {3, 4, 40});
  FaultInjectionOs os;
  auto source = RawFileSource::Open(path_, &os);
  ASSERT_TRUE(source.has_value());
  const uint64_t seeks = os.calls(FaultInjectionOs::Call::kLseek);
  EXPECT_GT(seeks, 0u);
  std::vector<std::byte> buf(kPage);
  for (uint64_t p = 0; p < 64; ++p) {
    ASSERT_TRUE((*source)->ExtentAt(FileOffset(p * kPage)).has_value());
    ASSERT_TRUE((*source)->ReadAt(FileOffset(p * kPage), buf));
  }
  EXPECT_EQ(os.calls(FaultInjectionOs::Call::kLseek), seeks);  // none on the fault path
}

TEST_F(RawFileSourceTest, WithoutSeekDataEverythingIsData) {
  Write(8, {2});
  FaultInjectionOs os;
  os.FailAlways(FaultInjectionOs::Call::kLseek, EINVAL);
  auto source = RawFileSource::Open(path_, &os);
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  auto e = (*source)->ExtentAt(FileOffset(0));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->kind, ExtentKind::kData);
  EXPECT_EQ(e->length, 8 * kPage);
  EXPECT_EQ((*source)->hole_bytes(), 0u);
  // Other lseek failures are real errors.
  os.FailAlways(FaultInjectionOs::Call::kLseek, EIO);
  auto failed = RawFileSource::Open(path_, &os);
  ASSERT_FALSE(failed.has_value());
  EXPECT_EQ(failed.error().code(), ErrorCode::kIoError);
  EXPECT_NE(failed.error().context().find("SEEK_DATA"), std::string::npos);
}

TEST_F(RawFileSourceTest, EmptyAndAllHoleFiles) {
  Write(0, {});
  auto empty = RawFileSource::Open(path_);
  ASSERT_TRUE(empty.has_value());
  EXPECT_EQ((*empty)->size(), 0u);
  EXPECT_EQ(testutil::ErrorCodeOf((*empty)->ExtentAt(FileOffset(0))), ErrorCode::kOutOfRange);
  std::vector<std::byte> none;
  EXPECT_TRUE((*empty)->ReadAt(FileOffset(0), none));
  Write(512, {});  // 2 MiB, all hole
  auto holes = RawFileSource::Open(path_);
  ASSERT_TRUE(holes.has_value());
  auto e = (*holes)->ExtentAt(FileOffset(0));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->kind, ExtentKind::kZero);
  EXPECT_EQ(e->length, 512 * kPage);
  EXPECT_NE((*holes)->Describe().find("snapshot.mem (2 MiB, 100% holes)"), std::string::npos)
      << (*holes)->Describe();
}

// Regression: open(2) of a FIFO for reading waited for a writer, so `gmem serve` given a FIFO
// never started and never said why.
TEST_F(RawFileSourceTest, OnlyRegularFilesAndBlockDevicesAreOpenedAndNothingWaits) {
  const std::string fifo = dir_ + "/memory.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  auto from_fifo = RawFileSource::Open(fifo);
  ASSERT_FALSE(from_fifo.has_value());
  EXPECT_EQ(from_fifo.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(from_fifo.error().context().find("is a FIFO, not a regular file or a block device"),
            std::string::npos)
      << from_fifo.error().ToString();
  auto from_char = RawFileSource::Open("/dev/zero");
  ASSERT_FALSE(from_char.has_value());
  EXPECT_NE(from_char.error().context().find("a character device"), std::string::npos)
      << from_char.error().ToString();
}

TEST_F(RawFileSourceTest, ABlockDeviceIsReadWithItsSizeFromLseek) {
  Write(64, {0, 1, 2, 63});
  std::string device;
  if (FILE* p = popen(("losetup -f --show " + path_ + " 2>/dev/null").c_str(), "r")) {
    char line[256] = {};
    if (fgets(line, sizeof(line), p) != nullptr) device = line;
    pclose(p);
  }
  while (!device.empty() && device.back() == '\n') device.pop_back();
  if (device.empty()) GTEST_SKIP() << "no loop device (losetup -f failed)";
  struct Detach {
    std::string device;
    ~Detach() { (void)!system(("losetup -d " + device).c_str()); }
  } detach{device};
  auto source = RawFileSource::Open(device);
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  EXPECT_EQ((*source)->size(), 64 * kPage);
  std::vector<std::byte> page(kPage);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(63 * kPage), page));
  EXPECT_EQ(page[0], std::byte{64});
  ASSERT_TRUE((*source)->ReadAt(FileOffset(10 * kPage), page));
  EXPECT_EQ(page[0], std::byte{0});
}

// Regression: the holes found at open were trusted for as long as the source lived, whatever
// happened to the file since.
TEST_F(RawFileSourceTest, WhatChangedSeesEveryChangeOfTheFile) {
  using std::chrono::nanoseconds;
  Write(16, {1, 2});
  auto source = RawFileSource::Open(path_, nullptr, nanoseconds(0));
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  auto same = (*source)->WhatChanged();
  ASSERT_TRUE(same.has_value()) << same.error().ToString();
  EXPECT_EQ(*same, "");
  // Grown in place.
  {
    UniqueFd fd(open(path_.c_str(), O_WRONLY | O_CLOEXEC));
    std::vector<uint8_t> page(kPage, 7);
    ASSERT_EQ(pwrite(fd.get(), page.data(), kPage, 16 * kPage), static_cast<ssize_t>(kPage));
  }
  auto grown = (*source)->WhatChanged();
  ASSERT_TRUE(grown.has_value()) << grown.error().ToString();
  EXPECT_NE(grown->find("size 65536 -> 69632"), std::string::npos) << *grown;
  // Another file renamed over the path.
  source = RawFileSource::Open(path_, nullptr, nanoseconds(0));
  ASSERT_TRUE(source.has_value());
  const std::string other = dir_ + "/other.mem";
  { UniqueFd fd(open(other.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)); }
  ASSERT_EQ(rename(other.c_str(), path_.c_str()), 0);
  auto replaced = (*source)->WhatChanged();
  ASSERT_TRUE(replaced.has_value()) << replaced.error().ToString();
  EXPECT_NE(replaced->find("is another file now"), std::string::npos) << *replaced;
  // Gone.
  ASSERT_EQ(unlink(path_.c_str()), 0);
  auto gone = (*source)->WhatChanged();
  EXPECT_EQ(testutil::ErrorCodeOf(gone), ErrorCode::kNotFound);
  // The source itself still reads what it opened.
  std::vector<std::byte> page(kPage);
  ASSERT_TRUE((*source)->ReadAt(FileOffset(kPage), page));
  EXPECT_EQ(page[0], std::byte{2});
}

TEST_F(RawFileSourceTest, AFileWrittenJustBeforeItWasOpenedIsNeverTakenToBeUnchanged) {
  // A write within the same tick of a coarse clock could leave every time stamp as it was.
  Write(16, {3});
  auto source = RawFileSource::Open(path_);
  ASSERT_TRUE(source.has_value()) << source.error().ToString();
  auto changed = (*source)->WhatChanged();
  ASSERT_TRUE(changed.has_value()) << changed.error().ToString();
  EXPECT_NE(changed->find("written less than 2 s before it was opened"), std::string::npos)
      << *changed;
}

TEST_F(RawFileSourceTest, OpenErrors) {
  auto missing = RawFileSource::Open(dir_ + "/missing");
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
  auto directory = RawFileSource::Open(dir_);
  ASSERT_FALSE(directory.has_value());
  EXPECT_EQ(directory.error().code(), ErrorCode::kInvalidArgument);
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
        for (std::byte b : buf) {
          if (b != want) {
            ++bad;
            break;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

}  // namespace
}  // namespace guestmem
