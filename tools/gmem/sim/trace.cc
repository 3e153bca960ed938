#include "sim/trace.h"

#include <fcntl.h>

#include <cerrno>
#include <charconv>
#include <cstdio>

#include "guestmem/os.h"
#include "guestmem/unique_fd.h"

namespace guestmem::sim {
namespace {

bool IsBlank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

std::string_view TrimBlanks(std::string_view s) {
  while (!s.empty() && IsBlank(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsBlank(s.back())) s.remove_suffix(1);
  return s;
}

Error LineError(uint32_t line, const std::string& what) {
  return Error(ErrorCode::kInvalidArgument, "trace line " + std::to_string(line) + ": " + what);
}

// Parses one line that is not blank or a comment.
Result<TraceAccess> ParseLine(std::string_view text, uint32_t line) {
  size_t word_end = 0;
  while (word_end < text.size() && !IsBlank(text[word_end])) ++word_end;
  const std::string_view kind = text.substr(0, word_end);
  TraceAccess access;
  access.line = line;
  if (kind == "r") {
    access.write = false;
  } else if (kind == "w") {
    access.write = true;
  } else {
    return LineError(line, "expected 'r' or 'w', got '" + std::string(kind) + "'");
  }
  std::string_view rest = TrimBlanks(text.substr(word_end));
  if (rest.empty()) return LineError(line, "missing offset after '" + std::string(kind) + "'");
  size_t number_end = 0;
  while (number_end < rest.size() && !IsBlank(rest[number_end])) ++number_end;
  std::string_view number = rest.substr(0, number_end);
  const std::string shown(number);
  if (number.size() > 2 && number[0] == '0' && (number[1] == 'x' || number[1] == 'X')) {
    number.remove_prefix(2);
  }
  const auto [end, ec] =
      std::from_chars(number.data(), number.data() + number.size(), access.offset, 16);
  if (ec == std::errc::result_out_of_range) {
    return LineError(line, "offset '" + shown + "' does not fit in 64 bits");
  }
  if (ec != std::errc() || end != number.data() + number.size()) {
    return LineError(line, "offset '" + shown + "' is not a hexadecimal number");
  }
  const std::string_view trailing = TrimBlanks(rest.substr(number_end));
  if (!trailing.empty()) {
    return LineError(line, "unexpected text '" + std::string(trailing) + "' after the offset");
  }
  return access;
}

}  // namespace

Result<std::vector<TraceAccess>> ParseTrace(std::string_view text) {
  std::vector<TraceAccess> accesses;
  uint32_t line = 0;
  while (!text.empty()) {
    ++line;
    const size_t newline = text.find('\n');
    std::string_view content = text.substr(0, newline);
    text.remove_prefix(newline == std::string_view::npos ? text.size() : newline + 1);
    content = TrimBlanks(content.substr(0, content.find('#')));
    if (content.empty()) continue;
    GM_ASSIGN_OR_RETURN(TraceAccess access, ParseLine(content, line));
    accesses.push_back(access);
  }
  return accesses;
}

Result<std::vector<TraceAccess>> LoadTrace(const std::string& path, Os* os) {
  if (os == nullptr) os = Os::Default();
  const int opened = os->Open(path.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (opened < 0) return PosixError(-opened, "open trace " + path);
  UniqueFd fd(opened);
  std::string text;
  char buffer[64 * 1024];
  while (true) {
    const ssize_t n = os->Read(fd.get(), buffer, sizeof(buffer));
    if (n == -EINTR) continue;
    if (n < 0) return PosixError(static_cast<int>(-n), "read trace " + path);
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
  }
  auto parsed = ParseTrace(text);
  if (!parsed) return std::move(parsed).error().WithContext(path);
  return parsed;
}

std::string FormatTrace(std::span<const TraceAccess> accesses) {
  std::string text;
  char line[32];
  for (const TraceAccess& a : accesses) {
    const int n = std::snprintf(line, sizeof(line), "%c 0x%llx\n", a.write ? 'w' : 'r',
                                static_cast<unsigned long long>(a.offset));
    text.append(line, static_cast<size_t>(n));
  }
  return text;
}

}  // namespace guestmem::sim
