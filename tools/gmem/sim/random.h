// SplitMix64: a tiny seeded pseudo-random generator whose sequence is the same on every platform
// and standard library (unlike std::uniform_int_distribution), so workloads and demo snapshots
// are reproducible from their seed.
//
// Thread safety: a value type; use one per thread.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_RANDOM_H_
#define GUESTMEM_TOOLS_GMEM_SIM_RANDOM_H_

#include <cstdint>

namespace guestmem::sim {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, bound) (Lemire's multiply-shift). REQUIRES: bound > 0.
  uint64_t Below(uint64_t bound) {
    __extension__ using Wide = unsigned __int128;
    return static_cast<uint64_t>((static_cast<Wide>(Next()) * bound) >> 64);
  }
  // Uniform in [lo, hi]. REQUIRES: lo <= hi < UINT64_MAX.
  uint64_t Between(uint64_t lo, uint64_t hi) { return lo + Below(hi - lo + 1); }

 private:
  uint64_t state_;
};

}  // namespace guestmem::sim

#endif  // GUESTMEM_TOOLS_GMEM_SIM_RANDOM_H_
