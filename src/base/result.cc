#include "guestmem/result.h"

#include <cerrno>
#include <cstring>
#include <string>

namespace guestmem {

bool IsRetryable(ErrorCode code) {
  return code == ErrorCode::kIoError || code == ErrorCode::kResourceExhausted;
}

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kOutOfRange: return "out of range";
    case ErrorCode::kAlreadyExists: return "already exists";
    case ErrorCode::kNotFound: return "not found";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kPermissionDenied: return "permission denied";
    case ErrorCode::kResourceExhausted: return "resource exhausted";
    case ErrorCode::kFailedPrecondition: return "failed precondition";
    case ErrorCode::kIoError: return "I/O error";
    case ErrorCode::kDataLoss: return "data loss";
    case ErrorCode::kProtocolError: return "protocol error";
    case ErrorCode::kPeerGone: return "peer gone";
    case ErrorCode::kInternal: return "internal error";
  }
  return "unknown error";
}

std::string Error::ToString() const {
  std::string out(ErrorCodeName(code_));
  if (!context_.empty()) {
    out += ": ";
    out += context_;
  }
  if (sys_errno_ != 0) {
    char buf[128];
    // GNU strerror_r returns the message pointer (thread-safe, unlike strerror).
    const char* msg = strerror_r(sys_errno_, buf, sizeof(buf));
    out += ": ";
    out += msg;
    out += " (errno " + std::to_string(sys_errno_) + ")";
  }
  return out;
}

Error&& Error::WithContext(std::string_view outer) && {
  context_ = std::string(outer) + (context_.empty() ? "" : ": ") + context_;
  return std::move(*this);
}

Error PosixError(int err, std::string context) {
  ErrorCode code;
  switch (err) {
    case EINVAL: code = ErrorCode::kInvalidArgument; break;
    case ERANGE:
    case EOVERFLOW:
    case EFBIG:
    case ENXIO: code = ErrorCode::kOutOfRange; break;
    case EEXIST: code = ErrorCode::kAlreadyExists; break;
    case ENOENT:
    case ENODEV: code = ErrorCode::kNotFound; break;
    case ENOSYS:
    case EOPNOTSUPP:
    case ENOTTY:
    case EPROTONOSUPPORT: code = ErrorCode::kUnsupported; break;
    case EPERM:
    case EACCES: code = ErrorCode::kPermissionDenied; break;
    case ENOMEM:
    case ENOSPC:
    case EMFILE:
    case ENFILE: code = ErrorCode::kResourceExhausted; break;
    case EBADF:
    case EBUSY: code = ErrorCode::kFailedPrecondition; break;
    case ESRCH:
    case EPIPE:
    case ECONNRESET:
    case ENOTCONN: code = ErrorCode::kPeerGone; break;
    default: code = ErrorCode::kIoError; break;
  }
  return Error(code, std::move(context), err);
}

}  // namespace guestmem
