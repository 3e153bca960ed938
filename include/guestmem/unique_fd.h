// UniqueFd: sole owner of a file descriptor; closes it on destruction. Move-only.
//
// Thread safety: like a plain int; a UniqueFd must not be reset while another thread uses get().
#ifndef GUESTMEM_UNIQUE_FD_H_
#define GUESTMEM_UNIQUE_FD_H_

#include <utility>

namespace guestmem {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  [[nodiscard]] int release() { return std::exchange(fd_, -1); }
  // Closes the current descriptor (errors from close are ignored: nothing useful can follow).
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

}  // namespace guestmem

#endif  // GUESTMEM_UNIQUE_FD_H_
