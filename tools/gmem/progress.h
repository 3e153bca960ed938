// Progress: one line on a terminal that a long command rewrites as it goes ("bench  12/84 runs
// 14%  sparse, 1 thread, reads: on-demand"), erased when done, so that what the command prints
// for keeps is not interleaved with it. Written to stderr, and only when stderr is a terminal and
// the caller did not ask for machine output (--json): piped, logged or scripted runs see nothing.
//
// Thread safety: one thread at a time.
#ifndef GUESTMEM_TOOLS_GMEM_PROGRESS_H_
#define GUESTMEM_TOOLS_GMEM_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>

namespace guestmem::cli {

class Progress {
 public:
  // `what`: the command ("bench"); `unit`: what is counted ("runs", "MiB"); `quiet`: --json.
  Progress(std::string what, std::string unit, uint64_t total, bool quiet);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  bool shown() const { return enabled_; }
  // Redraws the line (at most every 100 ms, and always when done == total).
  void Update(uint64_t done, const std::string& note = "");
  // Erases the line; Update() draws it again.
  void Clear();

 private:
  std::string what_;
  std::string unit_;
  uint64_t total_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_PROGRESS_H_
