#include "guestmem/userfault_bitmap.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace guestmem {
namespace {

// A bitmap memfd as Firecracker makes it: memory / 4096 / 8 bytes, every bit set.
UniqueFd FirecrackerBitmap(uint64_t memory_bytes) {
  UniqueFd fd(memfd_create("guest_mem", MFD_CLOEXEC));
  const uint64_t bytes = memory_bytes / 4096 / 8;
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
  std::vector<uint8_t> ones(bytes, 0xff);
  EXPECT_EQ(pwrite(fd.get(), ones.data(), bytes, 0), static_cast<ssize_t>(bytes));
  return fd;
}

TEST(UserfaultBitmapTest, BitsAreLeastSignificantFirstAndClearedInPlace) {
  const uint64_t memory = uint64_t{256} << 20;  // 65536 pages: 8 KiB of bitmap
  UniqueFd fd = FirecrackerBitmap(memory);
  const int raw = fd.get();
  auto bitmap = UserfaultBitmap::Map(std::move(fd), memory);
  ASSERT_TRUE(bitmap.has_value()) << bitmap.error().ToString();
  EXPECT_EQ((*bitmap)->page_count(), 65536u);
  EXPECT_EQ((*bitmap)->CountSet(0, 65536), 65536u);
  (*bitmap)->Clear(9, 1);
  (*bitmap)->Clear(60, 70);  // across two word boundaries
  EXPECT_TRUE((*bitmap)->IsSet(8));
  EXPECT_FALSE((*bitmap)->IsSet(9));
  EXPECT_FALSE((*bitmap)->IsSet(129));
  EXPECT_TRUE((*bitmap)->IsSet(130));
  EXPECT_EQ((*bitmap)->CountSet(0, 65536), 65536u - 71);
  // What KVM reads through its own view of the memfd: byte 1, bit 1 is page 9.
  uint8_t byte1 = 0;
  ASSERT_EQ(pread(raw, &byte1, 1, 1), 1);
  EXPECT_EQ(byte1, 0xff & ~0x02);
  uint8_t bytes[17];
  ASSERT_EQ(pread(raw, bytes, sizeof(bytes), 0), static_cast<ssize_t>(sizeof(bytes)));
  EXPECT_EQ(bytes[7], 0x0f);   // pages 56-59 set, 60-63 clear
  EXPECT_EQ(bytes[8], 0x00);   // 64-71
  EXPECT_EQ(bytes[16], 0xfc);  // 128, 129 clear; 130 on set
}

TEST(UserfaultBitmapTest, AMemfdThatDoesNotFitIsRefused) {
  const uint64_t memory = uint64_t{64} << 20;
  auto small = UserfaultBitmap::Map(FirecrackerBitmap(memory / 2), memory);
  ASSERT_FALSE(small.has_value());
  EXPECT_EQ(small.error().code(), ErrorCode::kInvalidArgument);
  auto huge = UserfaultBitmap::Map(FirecrackerBitmap(memory * 4), memory);
  ASSERT_FALSE(huge.has_value());
  auto odd = UserfaultBitmap::Map(FirecrackerBitmap(memory), memory + 4096);
  ASSERT_FALSE(odd.has_value());
  EXPECT_EQ(odd.error().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace guestmem
