// RunChild: runs a program to completion with its standard output captured (standard error
// passes through), for commands that drive other gmem commands (demo, bench).
#ifndef GUESTMEM_TOOLS_GMEM_CHILD_PROCESS_H_
#define GUESTMEM_TOOLS_GMEM_CHILD_PROCESS_H_

#include <string>
#include <vector>

#include "guestmem/result.h"

namespace guestmem::cli {

struct ChildResult {
  int exit_code = 0;   // or 128 + signal number if it was killed
  std::string output;  // everything it wrote to standard output
};

// REQUIRES: argv non-empty; argv[0] is a path.
Result<ChildResult> RunChild(const std::vector<std::string>& argv, bool quiet_stderr = false);

// The path of the running gmem executable (to start its own subcommands).
std::string SelfExecutable();

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_CHILD_PROCESS_H_
