#include "guestmem/log.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>

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
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
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

}  // namespace guestmem
