// TempDir: a fresh directory under /tmp, removed with everything in it when the object goes
// away; scratch space for tests and for commands (gmem bench). path() is empty if the directory
// could not be made.
//
// Thread safety: a value owned by one thread.
#ifndef GUESTMEM_BASE_TEMP_DIR_H_
#define GUESTMEM_BASE_TEMP_DIR_H_

#include <stdlib.h>

#include <filesystem>
#include <string>

namespace guestmem {

class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/guestmem-test-XXXXXX";
    if (mkdtemp(name) != nullptr) path_ = name;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }

  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace guestmem

#endif  // GUESTMEM_BASE_TEMP_DIR_H_
