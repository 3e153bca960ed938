#include "guestmem/page_state.h"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

namespace guestmem {
namespace {

using S = PageState;

TEST(PageStateMapTest, StartsAbsentAndSetsRanges) {
  PageStateMap map(100);  // not a multiple of 32
  EXPECT_EQ(map.CountInState(0, 100, S::kAbsent), 100u);
  map.Set(30, 40, S::kAllocated);  // spans three words
  EXPECT_EQ(map.Get(29), S::kAbsent);
  EXPECT_EQ(map.Get(30), S::kAllocated);
  EXPECT_EQ(map.Get(69), S::kAllocated);
  EXPECT_EQ(map.Get(70), S::kAbsent);
  EXPECT_EQ(map.CountInState(0, 100, S::kAllocated), 40u);
  map.Set(99, 1, S::kRemoved);
  EXPECT_EQ(map.Get(99), S::kRemoved);
  EXPECT_EQ(map.Get(98), S::kAbsent);
}

// Each operation, from each state: the resulting state and what it reports.
TEST(PageStateMapTest, TransitionTable) {
  const S states[] = {S::kAbsent, S::kAllocated, S::kPrepared, S::kRemoved};
  for (S from : states) {
    SCOPED_TRACE(std::string(PageStateName(from)));
    PageStateMap map(3);
    map.Set(1, 1, from);
    const bool was_empty = from == S::kAbsent || from == S::kRemoved;
    EXPECT_EQ(map.MarkAllocated(1, 1), was_empty ? 1u : 0u);
    EXPECT_EQ(map.Get(1), was_empty ? S::kAllocated : from);

    map.Set(1, 1, from);
    EXPECT_EQ(map.MarkPrepared(1, 1), from == S::kPrepared ? 0u : 1u);
    EXPECT_EQ(map.Get(1), S::kPrepared);

    map.Set(1, 1, from);
    EXPECT_EQ(map.TryMarkPrepared(1), from != S::kPrepared);
    EXPECT_EQ(map.Get(1), S::kPrepared);

    map.Set(1, 1, from);
    EXPECT_EQ(map.MarkPunched(1, 1), from == S::kPrepared ? 1u : 0u);
    const S after_punch = from == S::kPrepared ? S::kRemoved
                          : from == S::kAllocated ? S::kAbsent
                                                  : from;
    EXPECT_EQ(map.Get(1), after_punch);
    // Neighbours are never touched.
    EXPECT_EQ(map.Get(0), S::kAbsent);
    EXPECT_EQ(map.Get(2), S::kAbsent);
  }
}

TEST(PageStateMapTest, RangeOperationsCountAcrossWords) {
  PageStateMap map(1000);
  EXPECT_EQ(map.MarkPrepared(10, 500), 500u);
  EXPECT_EQ(map.MarkPrepared(0, 1000), 500u);
  EXPECT_EQ(map.CountPrepared(0, 1000), 1000u);
  EXPECT_TRUE(map.AllPrepared(5, 990));
  EXPECT_EQ(map.MarkPunched(100, 37), 37u);
  EXPECT_EQ(map.CountInState(0, 1000, S::kRemoved), 37u);
  EXPECT_EQ(map.MarkAllocated(0, 1000), 37u);
  EXPECT_EQ(map.CountInState(0, 1000, S::kAllocated), 37u);
}

TEST(PageStateMapTest, NextPreparedAndNotPrepared) {
  PageStateMap map(300);
  EXPECT_EQ(map.NextPrepared(0, 300), 300u);  // none: returns end
  EXPECT_EQ(map.NextNotPrepared(0, 300), 0u);
  map.MarkPrepared(0, 299);
  EXPECT_EQ(map.NextNotPrepared(0, 300), 299u);
  EXPECT_EQ(map.NextNotPrepared(0, 299), 299u);  // none inside [0, 299)
  map.Set(77, 1, S::kRemoved);
  EXPECT_EQ(map.NextNotPrepared(33, 300), 77u);
  EXPECT_EQ(map.NextNotPrepared(78, 300), 299u);
  map.Set(0, 300, S::kAllocated);
  map.MarkPrepared(257, 2);
  EXPECT_EQ(map.NextPrepared(5, 300), 257u);
  EXPECT_EQ(map.NextPrepared(258, 300), 258u);
  EXPECT_EQ(map.NextPrepared(259, 300), 300u);
}

TEST(PageStateMapTest, TwoBitsPerPage) {
  const uint64_t pages_64g = (uint64_t{64} << 30) / 4096;
  PageStateMap map(pages_64g);
  EXPECT_EQ(map.memory_bytes(), uint64_t{4} << 20);
  EXPECT_EQ(map.page_count(), pages_64g);
}

TEST(PageStateMapTest, ExactlyOneThreadWinsTryMarkPrepared) {
  constexpr uint64_t kPages = 4096;
  for (int round = 0; round < 5; ++round) {
    PageStateMap map(kPages);
    std::vector<std::atomic<int>> wins(kPages);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (uint64_t i = 0; i < kPages; ++i) {
          const uint64_t page = (i * 7 + static_cast<uint64_t>(t) * 13) % kPages;
          if (map.TryMarkPrepared(page)) wins[page]++;
        }
      });
    }
    for (auto& th : threads) th.join();
    for (uint64_t p = 0; p < kPages; ++p) ASSERT_EQ(wins[p].load(), 1) << "page " << p;
    EXPECT_EQ(map.CountPrepared(0, kPages), kPages);
  }
}

TEST(PageStateMapTest, ConcurrentRangeOperationsKeepEveryPageValid) {
  constexpr uint64_t kPages = 2048;
  PageStateMap map(kPages);
  std::atomic<uint64_t> prepared_marks{0}, released{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 3000; ++i) {
        const uint64_t first = rng() % kPages;
        const uint64_t count = 1 + rng() % std::min<uint64_t>(100, kPages - first);
        switch (rng() % 3) {
          case 0: prepared_marks += map.MarkPrepared(first, count); break;
          case 1: released += map.MarkPunched(first, count); break;
          default: map.MarkAllocated(first, count); break;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  // Each page's transitions into kPrepared minus those out of it (punches) is 1 if it ends
  // prepared and 0 otherwise: the totals must balance exactly.
  EXPECT_EQ(prepared_marks.load() - released.load(), map.CountPrepared(0, kPages));
  uint64_t total = 0;
  for (S s : {S::kAbsent, S::kAllocated, S::kPrepared, S::kRemoved}) {
    total += map.CountInState(0, kPages, s);
  }
  EXPECT_EQ(total, kPages);
}

}  // namespace
}  // namespace guestmem
