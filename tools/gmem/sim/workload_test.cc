#include "sim/workload.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <vector>

namespace guestmem::sim {
namespace {

constexpr uint64_t kPages = 16384;  // 64 MiB of 4 KiB pages
constexpr uint64_t kMemory = kPages * kAccessBytes;

WorkloadPlan Plan(const WorkloadSpec& spec, uint64_t memory = kMemory) {
  auto plan = PlanWorkload(spec, memory);
  EXPECT_TRUE(plan.has_value()) << plan.error().ToString();
  return plan ? *plan : WorkloadPlan{};
}

std::vector<Access> All(const WorkloadPlan& plan) {
  std::vector<Access> all;
  for (const auto& t : plan.threads) all.insert(all.end(), t.begin(), t.end());
  return all;
}

// Which thread each page was given to; fails the test if a page went to two threads.
std::map<uint64_t, size_t> OwnerOfEachPage(const WorkloadPlan& plan) {
  std::map<uint64_t, size_t> owner;
  for (size_t t = 0; t < plan.threads.size(); ++t) {
    for (const Access& a : plan.threads[t]) {
      auto [it, inserted] = owner.emplace(a.offset / kAccessBytes, t);
      EXPECT_EQ(it->second, t) << "page " << it->first << " in two threads";
    }
  }
  return owner;
}

TEST(WorkloadPlanTest, SequentialGivesEachThreadAContiguousShare) {
  const WorkloadPlan plan = Plan({.kind = WorkloadKind::kSequential, .threads = 3});
  ASSERT_EQ(plan.threads.size(), 3u);
  uint64_t next = 0;
  for (const auto& thread : plan.threads) {
    EXPECT_NEAR(static_cast<double>(thread.size()), kPages / 3.0, 1.0);
    for (const Access& a : thread) {
      EXPECT_EQ(a.offset, next * kAccessBytes);
      EXPECT_FALSE(a.write);
      ++next;
    }
  }
  EXPECT_EQ(next, kPages);
}

TEST(WorkloadPlanTest, SequentialPagesLimitsTheScan) {
  const WorkloadPlan plan = Plan({.kind = WorkloadKind::kSequential, .threads = 2, .pages = 10});
  const std::vector<Access> all = All(plan);
  ASSERT_EQ(all.size(), 10u);
  for (uint64_t i = 0; i < 10; ++i) EXPECT_EQ(all[i].offset, i * kAccessBytes);
  // More pages than memory: all of memory.
  EXPECT_EQ(All(Plan({.kind = WorkloadKind::kSequential, .pages = kPages * 2})).size(), kPages);
}

TEST(WorkloadPlanTest, RandomIsSeededAndKeepsEachPageInOneThread) {
  const WorkloadSpec spec{.kind = WorkloadKind::kRandom, .threads = 3, .pages = 50000, .seed = 5};
  const WorkloadPlan plan = Plan(spec);
  const std::vector<Access> all = All(plan);
  ASSERT_EQ(all.size(), 50000u);
  OwnerOfEachPage(plan);
  std::set<uint64_t> distinct;
  for (const Access& a : all) {
    EXPECT_LT(a.offset, kMemory);
    EXPECT_EQ(a.offset % kAccessBytes, 0u);
    distinct.insert(a.offset);
  }
  // 50000 draws from 16384 pages: repeats, and nearly every page (1 - e^-3 = 95%).
  EXPECT_GT(distinct.size(), kPages * 90 / 100);
  EXPECT_LT(distinct.size(), kPages);
  EXPECT_EQ(All(Plan(spec)), all);
  WorkloadSpec other = spec;
  other.seed = 6;
  EXPECT_NE(All(Plan(other)), all);
  // Default: as many accesses as pages.
  EXPECT_EQ(All(Plan({.kind = WorkloadKind::kRandom, .threads = 2})).size(), kPages);
}

// Maximal runs of consecutive pages in a set of page numbers: first page -> length.
std::map<uint64_t, uint64_t> Runs(const std::set<uint64_t>& pages) {
  std::map<uint64_t, uint64_t> runs;
  for (auto it = pages.begin(); it != pages.end();) {
    const uint64_t first = *it;
    uint64_t length = 0;
    while (it != pages.end() && *it == first + length) {
      ++length;
      ++it;
    }
    runs[first] = length;
  }
  return runs;
}

TEST(WorkloadPlanTest, SparseIsATenthOfMemoryInRunsOfOneToEight) {
  const WorkloadSpec spec{.kind = WorkloadKind::kSparse, .threads = 2, .seed = 11};
  const WorkloadPlan plan = Plan(spec);
  const std::vector<Access> all = All(plan);
  std::set<uint64_t> pages;
  for (const Access& a : all) pages.insert(a.offset / kAccessBytes);
  EXPECT_EQ(pages.size(), all.size()) << "a working-set page was visited twice";
  const double fraction = static_cast<double>(pages.size()) / kPages;
  EXPECT_GT(fraction, 0.08);
  EXPECT_LT(fraction, 0.12);
  const auto runs = Runs(pages);
  std::map<uint64_t, int> lengths;
  for (const auto& [first, length] : runs) {
    EXPECT_GE(length, 1u);
    EXPECT_LE(length, 8u);
    ++lengths[length];
  }
  EXPECT_EQ(lengths.size(), 8u) << "every run length from 1 to 8 occurs";
  // A run is visited whole, in order, by one thread; runs come in random order.
  const auto owner = OwnerOfEachPage(plan);
  for (const auto& [first, length] : runs) {
    for (uint64_t p = first; p < first + length; ++p) EXPECT_EQ(owner.at(p), owner.at(first));
  }
  size_t descents = 0;
  for (size_t i = 1; i < plan.threads[0].size(); ++i) {
    descents += plan.threads[0][i].offset < plan.threads[0][i - 1].offset;
  }
  EXPECT_GT(descents, runs.size() / 8) << "runs are not in random order";
  EXPECT_EQ(All(Plan(spec)), all);
  WorkloadSpec other = spec;
  other.seed = 12;
  EXPECT_NE(All(Plan(other)), all);
}

TEST(WorkloadPlanTest, SparsePagesSetsTheWorkingSetSize) {
  const std::vector<Access> all =
      All(Plan({.kind = WorkloadKind::kSparse, .threads = 1, .pages = 4000}));
  EXPECT_LE(all.size(), 4000u);
  EXPECT_GT(all.size(), 3400u);
}

TEST(WorkloadPlanTest, AccessModes) {
  for (WorkloadKind kind :
       {WorkloadKind::kSequential, WorkloadKind::kRandom, WorkloadKind::kSparse}) {
    SCOPED_TRACE(WorkloadKindName(kind));
    const auto reads = All(Plan({.kind = kind, .access = AccessMode::kRead}));
    EXPECT_TRUE(std::none_of(reads.begin(), reads.end(), [](const Access& a) { return a.write; }));
    const auto writes = All(Plan({.kind = kind, .access = AccessMode::kWrite}));
    EXPECT_TRUE(std::all_of(writes.begin(), writes.end(), [](const Access& a) { return a.write; }));
    const WorkloadSpec mixed_spec{.kind = kind, .access = AccessMode::kMixed, .seed = 4};
    const auto mixed = All(Plan(mixed_spec));
    const double written =
        static_cast<double>(
            std::count_if(mixed.begin(), mixed.end(), [](const Access& a) { return a.write; })) /
        static_cast<double>(mixed.size());
    EXPECT_GT(written, 0.4);
    EXPECT_LT(written, 0.6);
    EXPECT_EQ(All(Plan(mixed_spec)), mixed);
  }
}

TEST(WorkloadPlanTest, TraceKeepsOrderAndDealsPagesByNumber) {
  const std::vector<TraceAccess> trace = {
      {0x5123, true, 1}, {0x1000, false, 2}, {0x2fff, false, 3}, {0x5000, false, 4}};
  const WorkloadPlan plan = Plan(
      {.kind = WorkloadKind::kTrace, .access = AccessMode::kWrite, .threads = 2, .trace = trace});
  ASSERT_EQ(plan.threads.size(), 2u);
  // Pages 5, 1, 2, 5: odd pages to thread 1, even to thread 0; offsets rounded down to the page.
  EXPECT_EQ(plan.threads[0], (std::vector<Access>{{0x2000, false}}));
  EXPECT_EQ(plan.threads[1],
            (std::vector<Access>{{0x5000, true}, {0x1000, false}, {0x5000, false}}));
}

TEST(WorkloadPlanTest, BadSpecsNameWhatIsWrong) {
  auto no_threads = PlanWorkload({.threads = 0}, kMemory);
  ASSERT_FALSE(no_threads.has_value());
  EXPECT_EQ(no_threads.error().code(), ErrorCode::kInvalidArgument);

  auto odd_memory = PlanWorkload({}, 5000);
  ASSERT_FALSE(odd_memory.has_value());
  EXPECT_NE(odd_memory.error().context().find("0x1388"), std::string::npos);

  auto beyond = PlanWorkload(
      {.kind = WorkloadKind::kTrace, .trace = {{0x0, false, 3}, {kMemory, true, 9}}}, kMemory);
  ASSERT_FALSE(beyond.has_value());
  EXPECT_EQ(beyond.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(beyond.error().context().find("trace line 9"), std::string::npos)
      << beyond.error().ToString();

  auto empty = PlanWorkload({.kind = WorkloadKind::kTrace}, kMemory);
  ASSERT_FALSE(empty.has_value());
  EXPECT_NE(empty.error().context().find("no accesses"), std::string::npos);
}

TEST(WorkloadTest, WritePatternDependsOnTheOffset) {
  std::vector<std::byte> a(kAccessBytes), b(kAccessBytes), c(kAccessBytes);
  FillWritePattern(0x1000, a.data());
  FillWritePattern(0x1000, b.data());
  FillWritePattern(0x2000, c.data());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // No two words of a page alike, so a page shifted or mixed up with another is caught.
  std::set<uint64_t> words;
  for (size_t i = 0; i < kAccessBytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, a.data() + i, 8);
    words.insert(w);
  }
  EXPECT_EQ(words.size(), kAccessBytes / 8);
}

TEST(WorkloadTest, ResultAsJson) {
  WorkloadResult r;
  r.kind = WorkloadKind::kSparse;
  r.access = AccessMode::kMixed;
  r.elapsed_ns = 2'500'000;
  r.thread_ns = {1'000'000, 2'000'000};
  r.pages_touched = 10;
  r.distinct_pages = 9;
  r.pages_read = 6;
  r.pages_written = 4;
  r.verified = true;
  r.mismatches = 1;
  r.first_mismatch = Mismatch{0x3004, 1, 2, true};
  r.balloon = BalloonResult{0x1000, 0x2000, 2, 0, std::nullopt};
  const nlohmann::json j = WorkloadResultToJson(r);
  EXPECT_EQ(j["workload"], "sparse");
  EXPECT_EQ(j["access"], "mixed");
  EXPECT_EQ(j["threads"], 2);
  EXPECT_DOUBLE_EQ(j["elapsed_ms"].get<double>(), 2.5);
  EXPECT_EQ(j["thread_ms"], nlohmann::json::array({1.0, 2.0}));
  EXPECT_EQ(j["pages_touched"], 10);
  EXPECT_EQ(j["distinct_pages"], 9);
  EXPECT_EQ(j["mismatches"], 1);
  EXPECT_EQ(j["first_mismatch"]["offset"], 0x3004);
  EXPECT_EQ(j["first_mismatch"]["written"], true);
  EXPECT_EQ(j["balloon"]["pages_checked"], 2);
  EXPECT_TRUE(j["balloon"]["first_nonzero"].is_null());
  EXPECT_EQ(j["passed"], false);
  r.mismatches = 0;
  r.first_mismatch.reset();
  EXPECT_EQ(WorkloadResultToJson(r)["passed"], true);
  EXPECT_TRUE(WorkloadResultToJson(r)["first_mismatch"].is_null());
}

TEST(WorkloadPlanTest, CountsAccessesAndDistinctPages) {
  WorkloadPlan plan;
  plan.threads = {{{0, false}, {kAccessBytes, true}, {0, false}}, {{5 * kAccessBytes, false}}};
  EXPECT_EQ(plan.accesses(), 4u);
  EXPECT_EQ(plan.distinct_pages(), 3u);
  EXPECT_EQ(WorkloadPlan{}.accesses(), 0u);
  EXPECT_EQ(WorkloadPlan{}.distinct_pages(), 0u);
}

TEST(WorkloadNamesTest, ParsingIsTheInverseOfNaming) {
  for (WorkloadKind kind :
       {WorkloadKind::kSequential, WorkloadKind::kRandom, WorkloadKind::kSparse}) {
    auto parsed = ParseWorkloadKind(WorkloadKindName(kind));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, kind);
  }
  for (AccessMode mode : {AccessMode::kRead, AccessMode::kWrite, AccessMode::kMixed}) {
    auto parsed = ParseAccessMode(AccessModeName(mode));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, mode);
  }
  auto trace = ParseWorkloadKind("trace");  // needs its file: not a plain name
  ASSERT_FALSE(trace.has_value());
  EXPECT_EQ(trace.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(trace.error().ToString().find("sequential, random or sparse"), std::string::npos);
  auto access = ParseAccessMode("READ");
  ASSERT_FALSE(access.has_value());
  EXPECT_NE(access.error().ToString().find("read, write or mixed"), std::string::npos);
}

}  // namespace
}  // namespace guestmem::sim
