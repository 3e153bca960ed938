#include "guestmem/result.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

namespace guestmem {
namespace {

Result<int> ParsePositive(int v) {
  if (v <= 0) return Error(ErrorCode::kInvalidArgument, "value " + std::to_string(v) + " <= 0");
  return v;
}

Result<int> Doubled(int v) {
  GM_ASSIGN_OR_RETURN(int parsed, ParsePositive(v));
  return parsed * 2;
}

Status CheckBoth(int a, int b) {
  GM_RETURN_IF_ERROR(ParsePositive(a));
  GM_RETURN_IF_ERROR(ParsePositive(b));
  return OkStatus();
}

TEST(ResultTest, HoldsValueOrError) {
  Result<int> ok = Doubled(21);
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ(*ok, 42);
  EXPECT_EQ(ok.value_or(0), 42);

  Result<int> bad = Doubled(-1);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(bad.error().context(), "value -1 <= 0");
  EXPECT_EQ(bad.value_or(7), 7);
}

TEST(ResultTest, StatusPropagatesFirstError) {
  EXPECT_TRUE(CheckBoth(1, 2).has_value());
  Status s = CheckBoth(1, 0);
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().context(), "value 0 <= 0");
}

TEST(ResultTest, MoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  ASSERT_TRUE(r);
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 5);
}

TEST(ErrorTest, ToStringNamesCodeContextAndErrno) {
  Error e = PosixError(EIO, "pread snapshot at 0x2000");
  EXPECT_EQ(e.code(), ErrorCode::kIoError);
  EXPECT_EQ(e.sys_errno(), EIO);
  EXPECT_EQ(e.ToString(), "I/O error: pread snapshot at 0x2000: Input/output error (errno 5)");
  Error wrapped = std::move(e).WithContext("restore vm 3");
  EXPECT_EQ(wrapped.context(), "restore vm 3: pread snapshot at 0x2000");
}

TEST(ErrorTest, PosixErrorPicksCanonicalCodes) {
  EXPECT_EQ(PosixError(ENOMEM, "").code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(PosixError(EPERM, "").code(), ErrorCode::kPermissionDenied);
  EXPECT_EQ(PosixError(ESRCH, "").code(), ErrorCode::kPeerGone);
  EXPECT_EQ(PosixError(EEXIST, "").code(), ErrorCode::kAlreadyExists);
  EXPECT_EQ(PosixError(ENOSYS, "").code(), ErrorCode::kUnsupported);
  EXPECT_EQ(PosixError(EINVAL, "").code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace guestmem
