#include "guestmem/log.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <utility>

namespace guestmem {
namespace {

struct SinkState {
  std::mutex mu;
  std::shared_ptr<const LogSink> sink;  // null: default sink
  std::atomic<int> min_level{static_cast<int>(LogLevel::kInfo)};
};

SinkState& State() {
  static SinkState* const state = new SinkState();  // never destroyed: usable at exit
  return *state;
}

void DefaultSink(LogLevel level, std::string_view message) {
  std::fprintf(stderr, "%-7.*s %.*s\n", static_cast<int>(LogLevelName(level).size()),
               LogLevelName(level).data(), static_cast<int>(message.size()), message.data());
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}

void SetLogSink(LogSink sink, LogLevel min_level) {
  SinkState& state = State();
  std::lock_guard lock(state.mu);
  state.sink = sink ? std::make_shared<const LogSink>(std::move(sink)) : nullptr;
  state.min_level.store(static_cast<int>(min_level), std::memory_order_relaxed);
}

bool LogEnabled(LogLevel level) {
  return static_cast<int>(level) >= State().min_level.load(std::memory_order_relaxed);
}

void Log(LogLevel level, std::string_view message) {
  if (!LogEnabled(level)) return;
  SinkState& state = State();
  std::shared_ptr<const LogSink> sink;
  {
    std::lock_guard lock(state.mu);
    sink = state.sink;
  }
  if (sink) {
    (*sink)(level, message);
  } else {
    DefaultSink(level, message);
  }
}

RateLimitedLog::RateLimitedLog(std::chrono::milliseconds window,
                               std::function<Clock::time_point()> now)
    : window_(window), now_(now ? std::move(now) : [] { return Clock::now(); }) {}

RateLimitedLog::~RateLimitedLog() { Flush(/*force=*/true); }

void RateLimitedLog::EmitCountLocked(Clock::time_point now) {
  if (repeats_ == 0) return;
  const double seconds = std::chrono::duration<double>(now - window_start_).count();
  char suffix[96];
  (void)std::snprintf(suffix, sizeof(suffix), " (repeated %llu %s in the last %.1f s)",
                      static_cast<unsigned long long>(repeats_), repeats_ == 1 ? "time" : "times",
                      seconds);
  guestmem::Log(last_level_, last_ + suffix);
  ++logged_;
  repeats_ = 0;
  window_start_ = now;
}

void RateLimitedLog::Log(LogLevel level, std::string_view message) {
  if (!LogEnabled(level)) return;
  std::lock_guard lock(mu_);
  const Clock::time_point now = now_();
  if (logged_ > 0 && message == last_ && level == last_level_) {
    if (now - window_start_ >= window_ && repeats_ == 0) {
      // Quiet for a whole window: nothing to fold into.
      window_start_ = now;
      guestmem::Log(level, message);
      ++logged_;
      return;
    }
    ++repeats_;
    ++folded_;
    if (now - window_start_ >= window_) EmitCountLocked(now);
    return;
  }
  EmitCountLocked(now);
  last_.assign(message);
  last_level_ = level;
  window_start_ = now;
  guestmem::Log(level, message);
  ++logged_;
}

void RateLimitedLog::Flush(bool force) {
  std::lock_guard lock(mu_);
  const Clock::time_point now = now_();
  if (force || now - window_start_ >= window_) EmitCountLocked(now);
}

bool RateLimitedLog::has_pending() const {
  std::lock_guard lock(mu_);
  return repeats_ > 0;
}

uint64_t RateLimitedLog::logged() const {
  std::lock_guard lock(mu_);
  return logged_;
}

uint64_t RateLimitedLog::folded() const {
  std::lock_guard lock(mu_);
  return folded_;
}

}  // namespace guestmem
