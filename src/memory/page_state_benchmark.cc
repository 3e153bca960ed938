// The page-state map on a 64 GiB guest of 4 KiB pages (16 Mi pages, 4 MiB of state).
//
// Random offsets are drawn untimed, kBatch at a time, fresh for every batch (so the words they
// touch are not all in cache from the batch before). Benchmarks that change the map also reset
// it, untimed, between batches, so that they measure real transitions rather than pages that an
// earlier iteration already prepared.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "guestmem/page_state.h"

namespace guestmem {
namespace {

constexpr uint64_t kPages = (uint64_t{64} << 30) / 4096;
constexpr size_t kBatch = 4096;

// Random starts of ranges of `count` pages inside the map, drawn kBatch at a time.
class RandomStarts {
 public:
  RandomStarts(uint64_t count, uint64_t seed) : count_(count), rng_(seed), starts_(kBatch) {
    Refill();
  }

  uint64_t current() const { return starts_[next_]; }
  const std::vector<uint64_t>& batch() const { return starts_; }

  // Moves to the next start. After the last of a batch, untimed: calls reset() (to put the map
  // back as the benchmark wants it) and draws a new batch.
  template <typename Reset>
  void Advance(benchmark::State& state, Reset reset) {
    if (++next_ < kBatch) return;
    state.PauseTiming();
    reset();
    Refill();
    next_ = 0;
    state.ResumeTiming();
  }
  void Advance(benchmark::State& state) {
    Advance(state, [] {});
  }

 private:
  void Refill() {
    for (uint64_t& start : starts_) start = rng_() % (kPages - count_ + 1);
  }

  uint64_t count_;
  std::mt19937_64 rng_;
  std::vector<uint64_t> starts_;
  size_t next_ = 0;
};

// The map shared by the benchmarks that only read it: every other 4 KiB page prepared.
const PageStateMap& HalfPreparedMap() {
  static const PageStateMap* map = [] {
    auto* m = new PageStateMap(kPages);
    for (uint64_t p = 0; p < kPages; p += 2) m->Set(p, 1, PageState::kPrepared);
    return m;
  }();
  return *map;
}

void BM_MarkPrepared(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0));
  RandomStarts starts(count, 1);
  PageStateMap map(kPages);
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.MarkPrepared(starts.current(), count));
    starts.Advance(state, [&] { map.Set(0, kPages, PageState::kAbsent); });
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPrepared)->Arg(1)->Arg(16)->Arg(512);

void BM_MarkPunched(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0));
  RandomStarts starts(count, 2);
  PageStateMap map(kPages);
  map.MarkPrepared(0, kPages);
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.MarkPunched(starts.current(), count));
    starts.Advance(state, [&] { map.Set(0, kPages, PageState::kPrepared); });
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPunched)->Arg(16)->Arg(512);

// The page is not prepared yet: the thread wins it.
void BM_TryMarkPreparedWins(benchmark::State& state) {
  RandomStarts pages(1, 3);
  PageStateMap map(kPages);
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.TryMarkPrepared(pages.current()));
    pages.Advance(state, [&] {
      for (uint64_t page : pages.batch()) map.Set(page, 1, PageState::kAbsent);
    });
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TryMarkPreparedWins);

// The page is prepared already: the thread loses it.
void BM_TryMarkPreparedLoses(benchmark::State& state) {
  RandomStarts pages(1, 4);
  PageStateMap map(kPages);
  map.MarkPrepared(0, kPages);
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.TryMarkPrepared(pages.current()));
    pages.Advance(state);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TryMarkPreparedLoses);

// Argument: the range in bytes of guest memory (2 MiB, 1 GiB).
void BM_CountPrepared(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0)) / 4096;
  RandomStarts starts(count, 5);
  const PageStateMap& map = HalfPreparedMap();
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.CountPrepared(starts.current(), count));
    starts.Advance(state);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_CountPrepared)->Arg(2 << 20)->Arg(1 << 30);

// A mostly prepared map (one page in every 1 Mi is not): scan from a random page to the next
// page that is not prepared. Items are pages scanned.
void BM_NextNotPreparedScan(benchmark::State& state) {
  static const PageStateMap* map = [] {
    auto* m = new PageStateMap(kPages);
    m->MarkPrepared(0, kPages);
    for (uint64_t p = (1 << 20) - 1; p < kPages; p += (1 << 20)) m->Set(p, 1, PageState::kAbsent);
    return m;
  }();
  RandomStarts starts(1, 6);
  int64_t scanned = 0;
  for (auto _ : state) {
    const uint64_t found = map->NextNotPrepared(starts.current(), kPages);
    benchmark::DoNotOptimize(found);
    scanned += static_cast<int64_t>(found - starts.current() + 1);
    starts.Advance(state);
  }
  state.SetItemsProcessed(scanned);
}
BENCHMARK(BM_NextNotPreparedScan);

}  // namespace
}  // namespace guestmem

BENCHMARK_MAIN();
