// Progress of long work on a terminal: one line on stderr, redrawn at most ten times a second,
// erased when done. Quiet when stderr is not a terminal (pipes, CI) or when asked (--json).
//
// Thread safety: Update may be called from one thread at a time.
#ifndef GUESTMEM_TOOLS_GMEM_PROGRESS_H_
#define GUESTMEM_TOOLS_GMEM_PROGRESS_H_

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace guestmem::cli {

class TerminalProgress {
 public:
  TerminalProgress(std::string what, bool quiet)
      : what_(std::move(what)), shown_(!quiet && isatty(STDERR_FILENO) == 1) {}
  TerminalProgress(const TerminalProgress&) = delete;
  TerminalProgress& operator=(const TerminalProgress&) = delete;
  ~TerminalProgress() {
    if (drawn_) std::fprintf(stderr, "\r\033[K");
  }

  bool shown() const { return shown_; }

  // `done` of `total` (bytes when `bytes`, else items).
  void Update(uint64_t done, uint64_t total, bool bytes = true) {
    if (!shown_) return;
    const auto now = Clock::now();
    if (drawn_ && done < total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double percent = total == 0 ? 100.0 : 100.0 * static_cast<double>(done) /
                                                    static_cast<double>(total);
    if (bytes) {
      const double mib = static_cast<double>(done) / (1 << 20);
      std::fprintf(stderr, "\r\033[K%s: %5.1f%%  %.0f of %.0f MiB  %.0f MiB/s", what_.c_str(),
                   percent, mib, static_cast<double>(total) / (1 << 20),
                   seconds > 0 ? mib / seconds : 0.0);
    } else {
      std::fprintf(stderr, "\r\033[K%s: %5.1f%%  %llu of %llu", what_.c_str(), percent,
                   static_cast<unsigned long long>(done), static_cast<unsigned long long>(total));
    }
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string what_;
  bool shown_;
  bool drawn_ = false;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_{};
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_PROGRESS_H_
