// The number of descriptors this process has open (from /proc/self/fd), to show that something
// leaks none. -1 when /proc/self/fd cannot be listed.
#ifndef GUESTMEM_BASE_OPEN_FDS_H_
#define GUESTMEM_BASE_OPEN_FDS_H_

#include <dirent.h>

namespace guestmem {

inline int CountOpenFds() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(dir);
  return count;
}

}  // namespace guestmem

#endif  // GUESTMEM_BASE_OPEN_FDS_H_
