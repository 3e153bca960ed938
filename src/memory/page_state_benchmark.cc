// The page-state map on a 64 GiB guest of 4 KiB pages (16 Mi pages, 4 MiB of state).
//
// Random offsets are drawn before timing starts. Benchmarks that change the map start from a
// fresh (all absent) map and reset it, untimed, every kBatch operations, so that they measure
// real transitions rather than pages that an earlier iteration already prepared.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "guestmem/page_state.h"

namespace guestmem {
namespace {

constexpr uint64_t kPages = (uint64_t{64} << 30) / 4096;
constexpr size_t kBatch = 4096;

// kBatch random starts of ranges of `count` pages inside the map.
std::vector<uint64_t> RandomStarts(uint64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> starts(kBatch);
  for (uint64_t& start : starts) start = rng() % (kPages - count + 1);
  return starts;
}

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
  const std::vector<uint64_t> starts = RandomStarts(count, 1);
  PageStateMap map(kPages);
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.MarkPrepared(starts[i], count));
    if (++i == kBatch) {
      state.PauseTiming();
      map.Set(0, kPages, PageState::kAbsent);
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPrepared)->Arg(1)->Arg(16)->Arg(512);

void BM_MarkPunched(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0));
  const std::vector<uint64_t> starts = RandomStarts(count, 2);
  PageStateMap map(kPages);
  map.MarkPrepared(0, kPages);
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.MarkPunched(starts[i], count));
    if (++i == kBatch) {
      state.PauseTiming();
      map.Set(0, kPages, PageState::kPrepared);
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPunched)->Arg(16)->Arg(512);

// The page is not prepared yet: the thread wins it.
void BM_TryMarkPreparedWins(benchmark::State& state) {
  const std::vector<uint64_t> pages = RandomStarts(1, 3);
  PageStateMap map(kPages);
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.TryMarkPrepared(pages[i]));
    if (++i == kBatch) {
      state.PauseTiming();
      for (uint64_t page : pages) map.Set(page, 1, PageState::kAbsent);
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TryMarkPreparedWins);

// The page is prepared already: the thread loses it.
void BM_TryMarkPreparedLoses(benchmark::State& state) {
  const std::vector<uint64_t> pages = RandomStarts(1, 4);
  PageStateMap map(kPages);
  map.MarkPrepared(0, kPages);
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.TryMarkPrepared(pages[i]));
    i = (i + 1) % kBatch;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TryMarkPreparedLoses);

// Argument: the range in bytes of guest memory (2 MiB, 1 GiB).
void BM_CountPrepared(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0)) / 4096;
  const std::vector<uint64_t> starts = RandomStarts(count, 5);
  const PageStateMap& map = HalfPreparedMap();
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(map.CountPrepared(starts[i], count));
    i = (i + 1) % kBatch;
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
  const std::vector<uint64_t> starts = RandomStarts(1, 6);
  size_t i = 0;
  int64_t scanned = 0;
  for (auto _ : state) {
    const uint64_t found = map->NextNotPrepared(starts[i], kPages);
    benchmark::DoNotOptimize(found);
    scanned += static_cast<int64_t>(found - starts[i] + 1);
    i = (i + 1) % kBatch;
  }
  state.SetItemsProcessed(scanned);
}
BENCHMARK(BM_NextNotPreparedScan);

}  // namespace
}  // namespace guestmem

BENCHMARK_MAIN();
