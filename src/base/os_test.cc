#include "guestmem/os.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/fault_injection_os.h"
#include "guestmem/mapping.h"
#include "guestmem/unique_fd.h"
#include "testutil/error_code.h"

namespace guestmem {
namespace {

TEST(OsTest, DefaultReturnsNegativeErrno) {
  Os* os = Os::Default();
  char c;
  EXPECT_EQ(os->Pread(-1, &c, 1, 0), -EBADF);
  EXPECT_EQ(os->Open("/nonexistent/guestmem", O_RDONLY, 0), -ENOENT);
}

TEST(OsTest, MemfdRoundTrip) {
  Os* os = Os::Default();
  UniqueFd fd(os->MemfdCreate("os_test", MFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(os->Ftruncate(fd.get(), 8192), 0);
  ASSERT_EQ(os->Pwrite(fd.get(), "guest", 5, 4096), 5);
  char buf[5] = {};
  ASSERT_EQ(os->Pread(fd.get(), buf, 5, 4096), 5);
  EXPECT_EQ(std::memcmp(buf, "guest", 5), 0);
}

TEST(FaultInjectionOsTest, FailsChosenCallsThenForwards) {
  FaultInjectionOs os;
  UniqueFd fd(os.MemfdCreate("fi", MFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(os.Ftruncate(fd.get(), 4096), 0);
  os.FailNext(FaultInjectionOs::Call::kPwrite, EIO, /*times=*/2, /*skip=*/1);
  EXPECT_EQ(os.Pwrite(fd.get(), "a", 1, 0), 1);
  EXPECT_EQ(os.Pwrite(fd.get(), "a", 1, 0), -EIO);
  EXPECT_EQ(os.Pwrite(fd.get(), "a", 1, 0), -EIO);
  EXPECT_EQ(os.Pwrite(fd.get(), "a", 1, 0), 1);
  EXPECT_EQ(os.calls(FaultInjectionOs::Call::kPwrite), 4u);
}

TEST(MappingTest, OwnsAndUnmaps) {
  auto m = Mapping::Anonymous(2 * 4096);
  ASSERT_TRUE(m.has_value()) << m.error().ToString();
  std::memset(m->data(), 0xab, m->size());
  void* addr = m->data();
  Mapping moved = std::move(*m);
  EXPECT_FALSE(m->valid());
  EXPECT_EQ(moved.data(), addr);
  moved.reset();
  // The range is gone: mincore on an unmapped range fails with ENOMEM.
  unsigned char vec[2];
  EXPECT_EQ(mincore(addr, 2 * 4096, vec), -1);
  EXPECT_EQ(errno, ENOMEM);
}

TEST(MappingTest, ReportsMmapFailure) {
  FaultInjectionOs os;
  os.FailNext(FaultInjectionOs::Call::kMmap, ENOMEM);
  auto m = Mapping::Anonymous(4096, 0, &os);
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(testutil::ErrorCodeOf(Mapping::Anonymous(0)), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace guestmem
