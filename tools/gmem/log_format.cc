#include "log_format.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "guestmem/log.h"

namespace guestmem::cli {
namespace {

std::string Timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];  // room for any int the fields could hold, so the format cannot truncate
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(millis));
  return buf;
}

std::mutex& OutputMutex() {
  static std::mutex* const mu = new std::mutex();
  return *mu;
}

}  // namespace

void InstallLogFormat(bool json, bool verbose) {
  const LogLevel min = verbose ? LogLevel::kDebug : LogLevel::kInfo;
  if (json) {
    SetLogSink(
        [](LogLevel level, std::string_view message) {
          nlohmann::json line = {{"ts", Timestamp()},
                                 {"level", std::string(LogLevelName(level))},
                                 {"msg", std::string(message)}};
          const std::string text =
              line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
          std::lock_guard lock(OutputMutex());
          std::fprintf(stderr, "%s\n", text.c_str());
        },
        min);
    return;
  }
  SetLogSink(
      [](LogLevel level, std::string_view message) {
        const std::string ts = Timestamp();
        std::lock_guard lock(OutputMutex());
        std::fprintf(stderr, "%s %-7s %.*s\n", ts.c_str(), std::string(LogLevelName(level)).c_str(),
                     static_cast<int>(message.size()), message.data());
      },
      min);
}

}  // namespace guestmem::cli
