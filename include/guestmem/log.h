// Logging: one process-wide sink that the library writes its few messages to (a space torn down,
// a page poisoned and why). Programs choose the format by installing a sink; the default sink
// writes "LEVEL message" lines to stderr at kInfo and above.
//
// Thread safety: Log() may be called from any thread; SetLogSink() should be called before
// threads start logging (it is synchronized, but the previous sink may still be running).
#ifndef GUESTMEM_LOG_H_
#define GUESTMEM_LOG_H_

#include <functional>
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

}  // namespace guestmem

#endif  // GUESTMEM_LOG_H_
