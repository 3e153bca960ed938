#include "engine/token_bucket.h"

#include <algorithm>

namespace guestmem {
namespace {

// Tokens are counted in units of 1/kScale: one nanosecond at a rate of r a second brings r units.
constexpr int64_t kScale = 1'000'000'000;
// When() never answers later than this from now (a debt of years at a tiny rate): far enough to
// mean "not soon", near enough that adding it to a time point cannot overflow.
constexpr int64_t kLongestWaitNs = int64_t{365} * 24 * 3600 * kScale;

}  // namespace

TokenBucket::TokenBucket(uint64_t rate_per_second, uint64_t capacity, Clock::time_point now)
    : rate_(std::max<uint64_t>(rate_per_second, 1)),
      capacity_(std::max<uint64_t>(capacity, 1)),
      scaled_(Scaled{capacity_} * kScale),
      last_(now) {}

void TokenBucket::Refill(Clock::time_point now) {
  if (now <= last_) return;
  const Scaled full = Scaled{capacity_} * kScale;
  const Scaled elapsed_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
  last_ = now;
  // Compared before multiplying: a long pause fills the bucket without overflowing.
  const Scaled room = full - scaled_;
  if (elapsed_ns >= room / rate_ + 1) {
    scaled_ = full;
  } else {
    scaled_ = std::min(full, scaled_ + elapsed_ns * rate_);
  }
}

uint64_t TokenBucket::Available(Clock::time_point now) {
  Refill(now);
  return scaled_ <= 0 ? 0 : static_cast<uint64_t>(scaled_ / kScale);
}

void TokenBucket::Take(uint64_t n, Clock::time_point now) {
  Refill(now);
  scaled_ -= Scaled{n} * kScale;
}

TokenBucket::Clock::time_point TokenBucket::When(uint64_t n, Clock::time_point now) {
  Refill(now);
  const Scaled wanted = Scaled{std::min(n, capacity_)} * kScale;
  const Scaled missing = wanted - scaled_;
  if (missing <= 0) return std::max(now, last_);
  // Rounded up: at the time returned, the tokens are there.
  const Scaled ns = std::min<Scaled>((missing + rate_ - 1) / rate_, kLongestWaitNs);
  return last_ + std::chrono::nanoseconds(static_cast<int64_t>(ns));
}

}  // namespace guestmem
