#include "guestmem/page_state.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <latch>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace guestmem {
namespace {

using S = PageState;
constexpr std::array<S, 4> kAllStates = {S::kAbsent, S::kAllocated, S::kPrepared, S::kRemoved};

// The obvious one-page-at-a-time model of the map that the bit-parallel one must agree with.
class ModelMap {
 public:
  explicit ModelMap(uint64_t pages) : states_(pages, S::kAbsent) {}

  S Get(uint64_t page) const { return states_[page]; }
  void Set(uint64_t first, uint64_t count, S state) {
    std::fill_n(states_.begin() + static_cast<ptrdiff_t>(first), count, state);
  }
  // The transitions as the header states them, one table row per operation: the next state
  // and whether the page counts in the result, indexed by the current state (absent, allocated,
  // prepared, removed).
  uint64_t MarkAllocated(uint64_t first, uint64_t count) {
    return Apply(first, count, {S::kAllocated, S::kAllocated, S::kPrepared, S::kAllocated},
                 {true, false, false, true});
  }
  uint64_t MarkPrepared(uint64_t first, uint64_t count) {
    return Apply(first, count, {S::kPrepared, S::kPrepared, S::kPrepared, S::kPrepared},
                 {true, true, false, true});
  }
  uint64_t MarkPunched(uint64_t first, uint64_t count) {
    return Apply(first, count, {S::kAbsent, S::kAbsent, S::kRemoved, S::kRemoved},
                 {false, false, true, false});
  }
  uint64_t CountInState(uint64_t first, uint64_t count, S state) const {
    return static_cast<uint64_t>(std::count(states_.begin() + static_cast<ptrdiff_t>(first),
                                            states_.begin() + static_cast<ptrdiff_t>(first + count),
                                            state));
  }
  uint64_t Next(uint64_t first, uint64_t end, bool prepared) const {
    for (uint64_t p = first; p < end; ++p) {
      if ((states_[p] == S::kPrepared) == prepared) return p;
    }
    return end;
  }

 private:
  uint64_t Apply(uint64_t first, uint64_t count, const std::array<S, 4>& next,
                 const std::array<bool, 4>& counted) {
    uint64_t total = 0;
    for (uint64_t p = first; p < first + count; ++p) {
      const auto current = static_cast<size_t>(states_[p]);
      total += counted[current] ? 1 : 0;
      states_[p] = next[current];
    }
    return total;
  }

  std::vector<S> states_;
};

// Every page of `map` equals the model's; reports the first page that differs.
void ExpectSameStates(const PageStateMap& map, const ModelMap& model) {
  for (uint64_t p = 0; p < map.page_count(); ++p) {
    ASSERT_EQ(map.Get(p), model.Get(p)) << "page " << p;
  }
}

// A map (and its model) whose neighbouring pages hold different states, so an operation that
// leaks into the wrong slot shows.
void FillMixed(PageStateMap& map, ModelMap& model) {
  for (uint64_t p = 0; p < map.page_count(); ++p) {
    const S state = kAllStates[(p * 3 + p / 7) % 4];
    map.Set(p, 1, state);
    model.Set(p, 1, state);
  }
}

TEST(PageStateNameTest, NamesEveryState) {
  EXPECT_EQ(PageStateName(S::kAbsent), "absent");
  EXPECT_EQ(PageStateName(S::kAllocated), "allocated");
  EXPECT_EQ(PageStateName(S::kPrepared), "prepared");
  EXPECT_EQ(PageStateName(S::kRemoved), "removed");
}

TEST(PageStateMapTest, StartsAbsent) {
  PageStateMap map(100);  // not a multiple of 32
  EXPECT_EQ(map.page_count(), 100u);
  EXPECT_EQ(map.memory_bytes(), 4 * sizeof(uint64_t));
  EXPECT_EQ(map.CountInState(0, 100, S::kAbsent), 100u);
  EXPECT_EQ(map.Get(0), S::kAbsent);
  EXPECT_EQ(map.Get(99), S::kAbsent);
  EXPECT_EQ(map.NextPrepared(0, 100), 100u);
  EXPECT_EQ(map.NextNotPrepared(0, 100), 0u);
}

TEST(PageStateMapTest, EmptyMap) {
  PageStateMap map(0);
  EXPECT_EQ(map.page_count(), 0u);
  EXPECT_EQ(map.memory_bytes(), 0u);
  EXPECT_EQ(map.MarkPrepared(0, 0), 0u);
  EXPECT_EQ(map.CountPrepared(0, 0), 0u);
  EXPECT_TRUE(map.AllPrepared(0, 0));
  EXPECT_EQ(map.NextPrepared(0, 0), 0u);
  EXPECT_EQ(map.NextNotPrepared(0, 0), 0u);
}

TEST(PageStateMapTest, SixtyFourGibOfSmallPagesTakesFourMib) {
  const uint64_t pages = (uint64_t{64} << 30) / 4096;  // 16 Mi pages, four a byte
  PageStateMap map(pages);
  EXPECT_EQ(map.page_count(), pages);
  EXPECT_EQ(map.memory_bytes(), uint64_t{4} << 20);
  // The last page is usable and independent of the first.
  EXPECT_TRUE(map.TryMarkPrepared(pages - 1));
  EXPECT_EQ(map.Get(0), S::kAbsent);
  EXPECT_EQ(map.NextPrepared(0, pages), pages - 1);
  EXPECT_EQ(map.CountPrepared(0, pages), 1u);
}

// Each single-page operation from each state, at word boundaries and inside words, with every
// neighbour in a different state: the resulting state, the returned count, and that no other
// page changed.
TEST(PageStateMapTest, TransitionTable) {
  struct Row {
    S from;
    S after_allocate;
    uint64_t allocate_changed;
    S after_prepare;
    uint64_t prepare_changed;
    S after_punch;
    uint64_t punch_released;
  };
  const Row kTable[] = {
      {S::kAbsent, S::kAllocated, 1, S::kPrepared, 1, S::kAbsent, 0},
      {S::kAllocated, S::kAllocated, 0, S::kPrepared, 1, S::kAbsent, 0},
      {S::kPrepared, S::kPrepared, 0, S::kPrepared, 0, S::kRemoved, 1},
      {S::kRemoved, S::kAllocated, 1, S::kPrepared, 1, S::kRemoved, 0},
  };
  constexpr uint64_t kPages = 100;
  for (const Row& row : kTable) {
    for (uint64_t page : {uint64_t{0}, uint64_t{1}, uint64_t{31}, uint64_t{32}, uint64_t{50},
                          uint64_t{63}, uint64_t{64}, kPages - 1}) {
      SCOPED_TRACE("from " + std::string(PageStateName(row.from)) + " at page " +
                   std::to_string(page));
      PageStateMap map(kPages);
      ModelMap model(kPages);
      auto reset = [&] {
        FillMixed(map, model);
        map.Set(page, 1, row.from);
        model.Set(page, 1, row.from);
        ASSERT_EQ(map.Get(page), row.from);
      };

      // Runs `op` on the page from row.from; it must return `expected` and leave the page
      // `after` and every other page as it was.
      auto check = [&](auto op, uint64_t expected, S after) {
        reset();
        EXPECT_EQ(op(), expected);
        model.Set(page, 1, after);
        ExpectSameStates(map, model);
      };
      check([&] { return map.MarkAllocated(page, 1); }, row.allocate_changed, row.after_allocate);
      check([&] { return map.MarkPrepared(page, 1); }, row.prepare_changed, row.after_prepare);
      check([&] { return uint64_t{map.TryMarkPrepared(page)}; }, row.prepare_changed,
            row.after_prepare);
      check([&] { return map.MarkPunched(page, 1); }, row.punch_released, row.after_punch);
      for (S to : kAllStates) {
        check(
            [&] {
              map.Set(page, 1, to);
              return uint64_t{0};
            },
            0, to);
      }
    }
  }
}

TEST(PageStateMapTest, EmptyRangesChangeNothing) {
  PageStateMap map(70);
  ModelMap model(70);
  FillMixed(map, model);
  for (uint64_t first : {uint64_t{0}, uint64_t{17}, uint64_t{32}, uint64_t{70}}) {
    map.Set(first, 0, S::kPrepared);
    EXPECT_EQ(map.MarkAllocated(first, 0), 0u);
    EXPECT_EQ(map.MarkPrepared(first, 0), 0u);
    EXPECT_EQ(map.MarkPunched(first, 0), 0u);
    EXPECT_EQ(map.CountInState(first, 0, S::kAbsent), 0u);
    EXPECT_EQ(map.NextPrepared(first, first), first);
    EXPECT_EQ(map.NextNotPrepared(first, first), first);
  }
  ExpectSameStates(map, model);
}

TEST(PageStateMapTest, RangesAcrossManyWords) {
  constexpr uint64_t kPages = 1000;  // 31 words and 8 pages
  PageStateMap map(kPages);
  EXPECT_EQ(map.MarkPrepared(10, 500), 500u);  // starts and ends mid-word
  EXPECT_EQ(map.Get(9), S::kAbsent);
  EXPECT_EQ(map.Get(10), S::kPrepared);
  EXPECT_EQ(map.Get(509), S::kPrepared);
  EXPECT_EQ(map.Get(510), S::kAbsent);
  EXPECT_EQ(map.MarkPrepared(0, kPages), 500u);  // only the pages that were not prepared
  EXPECT_TRUE(map.AllPrepared(0, kPages));
  EXPECT_EQ(map.MarkPrepared(0, kPages), 0u);
  EXPECT_EQ(map.MarkPunched(100, 37), 37u);
  EXPECT_EQ(map.CountInState(0, kPages, S::kRemoved), 37u);
  EXPECT_FALSE(map.AllPrepared(0, kPages));
  EXPECT_TRUE(map.AllPrepared(0, 100));
  EXPECT_TRUE(map.AllPrepared(137, kPages - 137));
  EXPECT_EQ(map.MarkAllocated(0, kPages), 37u);
  EXPECT_EQ(map.CountInState(0, kPages, S::kAllocated), 37u);
  EXPECT_EQ(map.MarkPunched(0, kPages), kPages - 37);  // every prepared page is released
  EXPECT_EQ(map.CountInState(0, kPages, S::kRemoved), kPages - 37);
  EXPECT_EQ(map.CountInState(0, kPages, S::kAbsent), 37u);  // the allocated ones
  map.Set(0, kPages, S::kAllocated);
  EXPECT_EQ(map.CountInState(0, kPages, S::kAllocated), kPages);
  // The last page alone, and the last word's partial tail.
  EXPECT_EQ(map.MarkPrepared(kPages - 1, 1), 1u);
  EXPECT_EQ(map.CountPrepared(992, 8), 1u);
  EXPECT_EQ(map.NextPrepared(0, kPages), kPages - 1);
}

TEST(PageStateMapTest, NextPreparedAndNextNotPrepared) {
  PageStateMap map(300);
  EXPECT_EQ(map.NextPrepared(0, 300), 300u);  // none: returns end
  EXPECT_EQ(map.NextPrepared(5, 200), 200u);
  EXPECT_EQ(map.NextNotPrepared(0, 300), 0u);
  map.MarkPrepared(0, 299);
  EXPECT_EQ(map.NextNotPrepared(0, 300), 299u);
  EXPECT_EQ(map.NextNotPrepared(0, 299), 299u);  // none inside [0, 299)
  EXPECT_EQ(map.NextNotPrepared(40, 41), 41u);
  map.Set(77, 1, S::kRemoved);
  EXPECT_EQ(map.NextNotPrepared(33, 300), 77u);
  EXPECT_EQ(map.NextNotPrepared(77, 300), 77u);
  EXPECT_EQ(map.NextNotPrepared(78, 300), 299u);
  EXPECT_EQ(map.NextNotPrepared(33, 77), 77u);  // the hit is the end itself: none before it
  map.Set(0, 300, S::kAllocated);
  map.MarkPrepared(257, 2);
  EXPECT_EQ(map.NextPrepared(5, 300), 257u);
  EXPECT_EQ(map.NextPrepared(258, 300), 258u);
  EXPECT_EQ(map.NextPrepared(259, 300), 300u);
  EXPECT_EQ(map.NextPrepared(5, 257), 257u);
  EXPECT_EQ(map.NextPrepared(5, 258), 257u);
  map.MarkPrepared(0, 1);
  EXPECT_EQ(map.NextPrepared(0, 300), 0u);
  EXPECT_EQ(map.NextPrepared(1, 300), 257u);
}

// Random operations on random ranges (mid-word starts and ends, single pages, whole words, the
// first and last pages) agree with the one-page-at-a-time model: states, returned counts, counts
// and searches.
TEST(PageStateMapTest, AgreesWithModelOnRandomOperations) {
  for (uint64_t pages : {uint64_t{1}, uint64_t{31}, uint64_t{64}, uint64_t{237}, uint64_t{1029}}) {
    SCOPED_TRACE("pages " + std::to_string(pages));
    PageStateMap map(pages);
    ModelMap model(pages);
    std::mt19937_64 rng(pages);
    auto random_range = [&] {
      uint64_t first = rng() % (pages + 1);
      uint64_t count = rng() % (pages - first + 1);
      switch (rng() % 4) {
        case 0:  // aligned to words
          first -= first % 32;
          count = std::min<uint64_t>(count - count % 32 + 32, pages - first);
          break;
        case 1:  // up to the last page
          count = pages - first;
          break;
        default:
          break;
      }
      return std::pair(first, count);
    };
    for (int i = 0; i < 3000; ++i) {
      const auto [first, count] = random_range();
      const S state = kAllStates[rng() % 4];
      switch (rng() % 6) {
        case 0:
          map.Set(first, count, state);
          model.Set(first, count, state);
          break;
        case 1:
          ASSERT_EQ(map.MarkAllocated(first, count), model.MarkAllocated(first, count));
          break;
        case 2:
          ASSERT_EQ(map.MarkPrepared(first, count), model.MarkPrepared(first, count));
          break;
        case 3:
          ASSERT_EQ(map.MarkPunched(first, count), model.MarkPunched(first, count));
          break;
        case 4: {
          const uint64_t page = rng() % pages;
          const bool model_won = model.Get(page) != S::kPrepared;
          model.Set(page, 1, S::kPrepared);
          ASSERT_EQ(map.TryMarkPrepared(page), model_won);
          break;
        }
        default:
          ASSERT_EQ(map.CountInState(first, count, state), model.CountInState(first, count, state))
              << "[" << first << ", +" << count << ") " << PageStateName(state);
          ASSERT_EQ(map.NextPrepared(first, first + count), model.Next(first, first + count, true))
              << "[" << first << ", +" << count << ")";
          ASSERT_EQ(map.NextNotPrepared(first, first + count),
                    model.Next(first, first + count, false))
              << "[" << first << ", +" << count << ")";
          break;
      }
    }
    ExpectSameStates(map, model);
  }
}

// The searches on long runs, where whole words are skipped.
TEST(PageStateMapTest, SearchesSkipWholeWords) {
  constexpr uint64_t kPages = 100000;
  PageStateMap map(kPages);
  map.MarkPrepared(0, kPages);
  EXPECT_EQ(map.NextNotPrepared(0, kPages), kPages);
  map.Set(77777, 1, S::kAllocated);
  EXPECT_EQ(map.NextNotPrepared(3, kPages), 77777u);
  EXPECT_EQ(map.NextNotPrepared(77778, kPages), kPages);
  map.Set(0, kPages, S::kRemoved);
  EXPECT_EQ(map.NextPrepared(0, kPages), kPages);
  map.MarkPrepared(kPages - 1, 1);
  EXPECT_EQ(map.NextPrepared(1, kPages), kPages - 1);
  EXPECT_EQ(map.NextPrepared(1, kPages - 1), kPages - 1);
  EXPECT_EQ(map.CountPrepared(0, kPages), 1u);
  EXPECT_EQ(map.CountInState(0, kPages, S::kRemoved), kPages - 1);
}

TEST(PageStateMapTest, ExactlyOneThreadWinsTryMarkPrepared) {
  constexpr uint64_t kPages = 16384;
  constexpr int kThreads = 4;
  for (int round = 0; round < 6; ++round) {
    PageStateMap map(kPages);
    std::vector<std::atomic<int>> wins(kPages);
    std::latch start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        // Neighbouring threads walk in opposite directions; all start together.
        std::vector<uint64_t> order(kPages);
        for (uint64_t i = 0; i < kPages; ++i) order[i] = t % 2 == 0 ? i : kPages - 1 - i;
        start.arrive_and_wait();
        for (uint64_t page : order) {
          if (map.TryMarkPrepared(page)) wins[page].fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    for (uint64_t p = 0; p < kPages; ++p) {
      ASSERT_EQ(wins[p].load(), 1) << "round " << round << " page " << p;
    }
    EXPECT_TRUE(map.AllPrepared(0, kPages));
  }
}

TEST(PageStateMapTest, ConcurrentRangeOperationsKeepEveryPageValid) {
  constexpr uint64_t kPages = 2048;
  constexpr uint64_t kUsed = 2000;  // the last 48 pages are never touched
  constexpr int kThreads = 4;
  PageStateMap map(kPages);
  std::atomic<uint64_t> became_prepared{0};
  std::atomic<uint64_t> released{0};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t));
      start.arrive_and_wait();
      for (int i = 0; i < 4000; ++i) {
        const uint64_t first = rng() % kUsed;
        const uint64_t count = 1 + rng() % std::min<uint64_t>(100, kUsed - first);
        switch (rng() % 4) {
          case 0:
            became_prepared += map.MarkPrepared(first, count);
            break;
          case 1:
            released += map.MarkPunched(first, count);
            break;
          case 2:
            became_prepared += map.TryMarkPrepared(first) ? 1 : 0;
            break;
          default:
            map.MarkAllocated(first, count);
            break;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  // Every page's transitions into kPrepared minus those out of it (punches) is 1 if it ends
  // prepared and 0 otherwise: with no lost or doubled update the totals balance exactly.
  EXPECT_EQ(became_prepared.load() - released.load(), map.CountPrepared(0, kPages));
  uint64_t total = 0;
  for (S state : kAllStates) total += map.CountInState(0, kPages, state);
  EXPECT_EQ(total, kPages);
  EXPECT_EQ(map.CountInState(kUsed, kPages - kUsed, S::kAbsent), kPages - kUsed);
}

// A reader that sees kPrepared sees the content written before the page was marked. Checked for
// real under ThreadSanitizer: the content is plain memory, in 8-byte words (each written once and
// read once, which ThreadSanitizer tracks exactly), and nothing but the map orders the threads.
TEST(PageStateMapTest, PreparedPublishesContent) {
  constexpr uint64_t kPages = 512;
  constexpr uint64_t kPageWords = 8;
  PageStateMap map(kPages);
  std::vector<uint64_t> content(kPages * kPageWords);
  auto expected = [](uint64_t page, uint64_t i) { return page * 1000 + i + 1; };
  std::thread writer([&] {
    for (uint64_t p = 0; p < kPages; ++p) {
      if (p % 16 == 0) std::this_thread::yield();  // let the reader catch up now and then
      for (uint64_t i = 0; i < kPageWords; ++i) content[p * kPageWords + i] = expected(p, i);
      if (p % 3 == 0) {
        map.MarkPrepared(p, 1);
      } else if (p % 3 == 1) {
        ASSERT_TRUE(map.TryMarkPrepared(p));
      } else {
        map.Set(p, 1, S::kPrepared);
      }
    }
  });
  std::thread reader([&] {
    uint64_t next = 0;
    while (next < kPages) {
      const uint64_t not_prepared = map.NextNotPrepared(next, kPages);
      for (; next < not_prepared; ++next) {
        for (uint64_t i = 0; i < kPageWords; ++i) {
          ASSERT_EQ(content[next * kPageWords + i], expected(next, i)) << "page " << next;
        }
      }
      std::this_thread::yield();
    }
  });
  writer.join();
  reader.join();
  EXPECT_TRUE(map.AllPrepared(0, kPages));
}

TEST(PageStateMapDeathTest, RangesOutsideTheMapAreCaught) {
#ifdef NDEBUG
  GTEST_SKIP() << "assertions are compiled out of this build";
#else
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  PageStateMap map(40);
  EXPECT_DEATH(map.Get(40), "page < page_count_");
  EXPECT_DEATH(map.MarkPrepared(39, 2), "");
  EXPECT_DEATH(map.MarkPrepared(UINT64_MAX, 2), "");
  EXPECT_DEATH(map.NextNotPrepared(10, 41), "");
  EXPECT_DEATH(map.NextPrepared(11, 10), "");
#endif
}

}  // namespace
}  // namespace guestmem
