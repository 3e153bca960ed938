#include "progress.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

namespace guestmem::cli {
namespace {

constexpr auto kRedrawInterval = std::chrono::milliseconds(100);
constexpr size_t kMaxNote = 60;

}  // namespace

Progress::Progress(std::string what, std::string unit, uint64_t total, bool quiet)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(!quiet && isatty(STDERR_FILENO) == 1) {}

Progress::~Progress() { Clear(); }

void Progress::Update(uint64_t done, const std::string& note) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && done < total_ && now - last_ < kRedrawInterval) return;
  last_ = now;
  const unsigned percent =
      total_ == 0 ? 100 : static_cast<unsigned>(100 * std::min(done, total_) / total_);
  std::string shown = note.size() > kMaxNote ? note.substr(0, kMaxNote - 3) + "..." : note;
  // \r to the line's start, the line, then erase what an earlier, longer line left.
  std::fprintf(stderr, "\r%s  %llu/%llu %s %3u%%  %s\033[K", what_.c_str(),
               static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_),
               unit_.c_str(), percent, shown.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::Clear() {
  if (!enabled_ || !drawn_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  drawn_ = false;
}

}  // namespace guestmem::cli
