// The page-state map on a 64 GiB guest of 4 KiB pages (16 Mi pages, 4 MiB of state).
#include <benchmark/benchmark.h>

#include <random>

#include "guestmem/page_state.h"

namespace guestmem {
namespace {

constexpr uint64_t kPages = (uint64_t{64} << 30) / 4096;

PageStateMap& Map() {
  static PageStateMap* map = new PageStateMap(kPages);
  return *map;
}

void BM_MarkPrepared(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0));
  std::mt19937_64 rng(1);
  for (auto _ : state) {
    const uint64_t first = rng() % (kPages - count);
    benchmark::DoNotOptimize(Map().MarkPrepared(first, count));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPrepared)->Arg(1)->Arg(16)->Arg(512);

void BM_TryMarkPrepared(benchmark::State& state) {
  std::mt19937_64 rng(2);
  for (auto _ : state) benchmark::DoNotOptimize(Map().TryMarkPrepared(rng() % kPages));
}
BENCHMARK(BM_TryMarkPrepared);

void BM_MarkPunched(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0));
  std::mt19937_64 rng(3);
  for (auto _ : state) {
    const uint64_t first = rng() % (kPages - count);
    benchmark::DoNotOptimize(Map().MarkPunched(first, count));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_MarkPunched)->Arg(16)->Arg(512);

void BM_CountPrepared(benchmark::State& state) {
  const uint64_t count = static_cast<uint64_t>(state.range(0)) / 4096;
  std::mt19937_64 rng(4);
  for (auto _ : state) {
    const uint64_t first = rng() % (kPages - count);
    benchmark::DoNotOptimize(Map().CountPrepared(first, count));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(count));
}
BENCHMARK(BM_CountPrepared)->Arg(2 << 20)->Arg(1 << 30);

void BM_NextNotPreparedScan(benchmark::State& state) {
  // A mostly prepared map: one hole every 1 Mi pages; scan from a random start to the next.
  static PageStateMap* map = [] {
    auto* m = new PageStateMap(kPages);
    m->MarkPrepared(0, kPages);
    for (uint64_t p = 0; p < kPages; p += (1 << 20)) m->Set(p, 1, PageState::kAbsent);
    return m;
  }();
  std::mt19937_64 rng(5);
  for (auto _ : state) benchmark::DoNotOptimize(map->NextNotPrepared(rng() % kPages, kPages));
}
BENCHMARK(BM_NextNotPreparedScan);

}  // namespace
}  // namespace guestmem

BENCHMARK_MAIN();
