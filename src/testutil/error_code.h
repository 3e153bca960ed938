// ErrorCodeOf: the error code of a Result for test expectations, or std::nullopt when it holds a
// value, so that `EXPECT_EQ(ErrorCodeOf(Open(path)), ErrorCode::kNotFound)` fails cleanly instead
// of taking error() from a value.
#ifndef GUESTMEM_TESTUTIL_ERROR_CODE_H_
#define GUESTMEM_TESTUTIL_ERROR_CODE_H_

#include <optional>
#include <string>

#include "guestmem/result.h"

namespace guestmem::testutil {

template <typename R>
std::optional<ErrorCode> ErrorCodeOf(const R& result) {
  if (result.has_value()) return std::nullopt;
  return result.error().code();
}

// For failure messages: "ok", or the error.
template <typename R>
std::string Describe(const R& result) {
  return result.has_value() ? std::string("ok") : result.error().ToString();
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_ERROR_CODE_H_
