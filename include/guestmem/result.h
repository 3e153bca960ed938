// Error and Result<T>: how every fallible guestmem operation reports failure.
//
// An Error carries a canonical ErrorCode (what kind of failure, so callers can branch on it), the
// errno of the system call that failed (0 when none did), and a context string naming the
// operation and its arguments ("punch_hole: offset 0x1001 is not aligned to 4096").
//
// Result<T> holds either a T or an Error. Its members are named as std::expected's (has_value,
// value, error, value_or, operator*, operator->) so that moving to C++23 is mechanical.
// Result<void> (alias Status) carries only success or an Error.
//
// Thread safety: value types; no shared state.
#ifndef GUESTMEM_RESULT_H_
#define GUESTMEM_RESULT_H_

#include <cassert>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace guestmem {

// Canonical error codes. Pick the one a caller would branch on:
enum class ErrorCode {
  kInvalidArgument,     // the caller passed something malformed (unaligned, zero length, bad JSON)
  kOutOfRange,          // well-formed but outside the object (past end of file, address overflow)
  kAlreadyExists,       // the target is already in the requested state (page already prepared)
  kNotFound,            // a named thing does not exist (file, region, binding)
  kUnsupported,         // this backend or this kernel cannot do it (no /dev/kvm, no MINOR mode)
  kPermissionDenied,    // the owner or the kernel forbids it (mmap refused by a binding, EPERM)
  kResourceExhausted,   // out of memory, huge pages, descriptors
  kFailedPrecondition,  // the object is not in a state that allows it (not mapped, closed)
  kIoError,             // a read or write failed (EIO, short read of a source)
  kDataLoss,            // content is missing or corrupt (truncated snapshot)
  kProtocolError,       // a peer spoke the wire protocol wrongly (handshake)
  kPeerGone,            // the other side went away (hang-up, ESRCH: faulting task exited)
  kInternal,            // a broken invariant inside guestmem
};

std::string_view ErrorCodeName(ErrorCode code);
// Whether trying the same thing again may succeed: a failed read or exhausted resources may pass;
// corrupt content, a malformed argument or a missing thing stay what they are.
bool IsRetryable(ErrorCode code);

class Error {
 public:
  Error(ErrorCode code, std::string context, int sys_errno = 0)
      : code_(code), sys_errno_(sys_errno), context_(std::move(context)) {}

  ErrorCode code() const { return code_; }
  // The errno of the failed system call, or 0 if the failure was not a system call's.
  int sys_errno() const { return sys_errno_; }
  const std::string& context() const { return context_; }

  // "invalid argument: punch_hole: offset 0x1001 is not aligned to 4096"
  // "I/O error: pread snapshot.mem at 0x2000: Input/output error (errno 5)"
  std::string ToString() const;

  // Prefixes the context with an outer operation: "restore vm 3: " + inner context.
  Error&& WithContext(std::string_view outer) &&;

 private:
  ErrorCode code_;
  int sys_errno_;
  std::string context_;
};

// The one place errno becomes an Error: picks the ErrorCode that fits `err` (ENOMEM ->
// kResourceExhausted, EPERM/EACCES -> kPermissionDenied, ESRCH/EPIPE -> kPeerGone, ...).
Error PosixError(int err, std::string context);

template <typename T>
class [[nodiscard]] Result {
 public:
  using value_type = T;
  using error_type = Error;

  Result(const T& value) : storage_(value) {}          // NOLINT: implicit by design
  Result(T&& value) : storage_(std::move(value)) {}    // NOLINT
  Result(Error error) : storage_(std::move(error)) {}  // NOLINT
  template <typename U, typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                                    !std::is_same_v<std::decay_t<U>, Error> &&
                                                    !std::is_same_v<std::decay_t<U>, Result>>>
  Result(U&& value) : storage_(std::in_place_index<0>, std::forward<U>(value)) {}  // NOLINT

  bool has_value() const { return storage_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  // REQUIRES: has_value().
  T& value() & {
    assert(has_value());
    return std::get<0>(storage_);
  }
  const T& value() const& {
    assert(has_value());
    return std::get<0>(storage_);
  }
  T&& value() && {
    assert(has_value());
    return std::get<0>(std::move(storage_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  template <typename U>
  T value_or(U&& fallback) const& {
    return has_value() ? value() : static_cast<T>(std::forward<U>(fallback));
  }

  // REQUIRES: !has_value().
  const Error& error() const& {
    assert(!has_value());
    return std::get<1>(storage_);
  }
  Error&& error() && {
    assert(!has_value());
    return std::get<1>(std::move(storage_));
  }

 private:
  std::variant<T, Error> storage_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  using value_type = void;
  using error_type = Error;

  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT: implicit by design

  bool has_value() const { return ok_; }
  explicit operator bool() const { return ok_; }
  void value() const { assert(ok_); }

  // REQUIRES: !has_value().
  const Error& error() const& {
    assert(!ok_);
    return error_;
  }
  Error&& error() && {
    assert(!ok_);
    return std::move(error_);
  }

 private:
  Error error_{ErrorCode::kInternal, ""};
  bool ok_ = true;
};

using Status = Result<void>;

inline Status OkStatus() { return Status(); }

}  // namespace guestmem

#define GM_CONCAT_INNER_(a, b) a##b
#define GM_CONCAT_(a, b) GM_CONCAT_INNER_(a, b)

// `lhs` is a declaration or an lvalue, so it cannot be parenthesised.
// NOLINTBEGIN(bugprone-macro-parentheses)

// Returns the error of `expr` (a Result or Status) from the enclosing function.
#define GM_RETURN_IF_ERROR(expr)                                       \
  do {                                                                 \
    auto&& gm_status_ = (expr);                                        \
    if (!gm_status_.has_value()) return std::move(gm_status_).error(); \
  } while (0)

// `GM_ASSIGN_OR_RETURN(auto fd, OpenFile(path));` declares/assigns lhs or returns the error.
#define GM_ASSIGN_OR_RETURN(lhs, expr) \
  GM_ASSIGN_OR_RETURN_IMPL_(GM_CONCAT_(gm_result_, __LINE__), lhs, expr)
#define GM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)      \
  auto tmp = (expr);                                   \
  if (!tmp.has_value()) return std::move(tmp).error(); \
  lhs = std::move(tmp).value()

// NOLINTEND(bugprone-macro-parentheses)

#endif  // GUESTMEM_RESULT_H_
