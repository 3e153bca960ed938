// TokenBucket: a rate limit for background work (the background fill's bytes a second).
//
// The bucket holds up to `capacity` tokens and gains `rate` tokens a second. Work takes tokens
// as it is done; once they run out, When() says at what time enough will be there again, so that
// the caller can come back then instead of polling. Taking more than is there leaves a debt that
// is paid back before anything is available again, so work may be charged after it is done (an
// install whose size is known only afterwards).
//
// The bucket holds no clock: every call is given the time, a steady_clock time point, so that a
// test drives it with times of its own. A time earlier than one already seen counts as that one.
// Arithmetic is exact (tokens are kept in units of 1/10^9, in 128 bits): no drift, however long it
// runs and however small the steps.
//
// Thread safety: one thread at a time.
#ifndef GUESTMEM_ENGINE_TOKEN_BUCKET_H_
#define GUESTMEM_ENGINE_TOKEN_BUCKET_H_

#include <chrono>
#include <cstdint>

namespace guestmem {

class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;

  // Full at `now`. REQUIRES: rate_per_second >= 1, capacity >= 1.
  TokenBucket(uint64_t rate_per_second, uint64_t capacity, Clock::time_point now);

  // Whole tokens there at `now`, at most capacity(); 0 while a debt is being paid back.
  uint64_t Available(Clock::time_point now);
  // Takes `n` tokens at `now` (any number: more than Available leaves a debt).
  void Take(uint64_t n, Clock::time_point now);
  // The earliest time at which Available() reaches `n`: `now` if it already has.
  // REQUIRES: n <= capacity() (a larger n is never reached; it is treated as capacity()).
  Clock::time_point When(uint64_t n, Clock::time_point now);

  uint64_t rate_per_second() const { return rate_; }
  uint64_t capacity() const { return capacity_; }

 private:
  __extension__ using Scaled = __int128;  // tokens x kScale

  void Refill(Clock::time_point now);

  uint64_t rate_;
  uint64_t capacity_;
  Scaled scaled_;  // tokens x kScale; negative: a debt
  Clock::time_point last_;
};

}  // namespace guestmem

#endif  // GUESTMEM_ENGINE_TOKEN_BUCKET_H_
