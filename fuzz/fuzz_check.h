// What every fuzz target checks its properties with: a property that does not hold is reported
// with the target's name and aborts, which libFuzzer records as a crash with its input.
#ifndef GUESTMEM_FUZZ_FUZZ_CHECK_H_
#define GUESTMEM_FUZZ_FUZZ_CHECK_H_

#include <errno.h>

#include <cstdio>
#include <cstdlib>

namespace guestmem {

inline void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "%s: property violated: %s\n", program_invocation_short_name, what);
    std::abort();
  }
}

}  // namespace guestmem

#endif  // GUESTMEM_FUZZ_FUZZ_CHECK_H_
