// Logging: one process-wide sink that the library writes its few messages to (a space torn down,
// a page poisoned and why), and RateLimitedLog for lines that may repeat without end. Programs
// choose the format by installing a sink; the default sink writes "LEVEL message" lines to stderr
// at kInfo and above.
//
// Thread safety: Log() may be called from any thread; SetLogSink() should be called before
// threads start logging (it is synchronized, but the previous sink may still be running).
#ifndef GUESTMEM_LOG_H_
#define GUESTMEM_LOG_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>

namespace guestmem {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

std::string_view LogLevelName(LogLevel level);  // "debug", "info", "warning", "error"

using LogSink = std::function<void(LogLevel level, std::string_view message)>;

// Replaces the sink; an empty function restores the default. Messages below `min_level` are
// dropped before formatting reaches the sink.
void SetLogSink(LogSink sink, LogLevel min_level = LogLevel::kInfo);
bool LogEnabled(LogLevel level);
void Log(LogLevel level, std::string_view message);

// RateLimitedLog: one call site's log lines, with repeated identical lines folded, so that an
// error that recurs thousands of times a second (accept at EMFILE, a flood of refused clients)
// costs a line every few seconds instead of filling the disk.
//
// The first line of a message is logged at once. The same message again within `window` of the
// last line logged for it is only counted; once the window has passed, the count is logged as
// "<message> (repeated 1234 times in the last 5.0 s)" and a new window starts. A different
// message ends the fold: the previous one's count is logged first, then the new line. Flush()
// logs a count still pending once its window has passed (or at once with `force`), for callers
// with a timer and at shutdown.
//
// Thread safety: every method may be called from any thread.
class RateLimitedLog {
 public:
  using Clock = std::chrono::steady_clock;

  // `now` replaces the clock in tests.
  explicit RateLimitedLog(std::chrono::milliseconds window = std::chrono::seconds(5),
                          std::function<Clock::time_point()> now = {});
  ~RateLimitedLog();  // logs a pending count
  RateLimitedLog(const RateLimitedLog&) = delete;
  RateLimitedLog& operator=(const RateLimitedLog&) = delete;

  void Log(LogLevel level, std::string_view message);
  void Flush(bool force = false);

  // Whether a count of folded lines waits to be logged.
  bool has_pending() const;
  // Lines logged and lines folded so far (for tests and statistics).
  uint64_t logged() const;
  uint64_t folded() const;

 private:
  // REQUIRES: mu_ held.
  void EmitCountLocked(Clock::time_point now);

  const std::chrono::milliseconds window_;
  const std::function<Clock::time_point()> now_;
  mutable std::mutex mu_;
  std::string last_;                       // GUARDED_BY(mu_)
  LogLevel last_level_ = LogLevel::kInfo;  // GUARDED_BY(mu_)
  Clock::time_point window_start_;         // GUARDED_BY(mu_)
  uint64_t repeats_ = 0;                   // GUARDED_BY(mu_): folded since window_start_
  uint64_t logged_ = 0;                    // GUARDED_BY(mu_)
  uint64_t folded_ = 0;                    // GUARDED_BY(mu_)
};

}  // namespace guestmem

#endif  // GUESTMEM_LOG_H_
