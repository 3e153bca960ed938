#include "guestmem/log.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

namespace guestmem {
namespace {

using namespace std::chrono_literals;
using Clock = RateLimitedLog::Clock;

// Captures what reaches the sink for the life of the object.
class CapturedLog {
 public:
  CapturedLog() {
    SetLogSink([this](LogLevel level, std::string_view message) {
      std::lock_guard lock(mu_);
      lines_.push_back(std::string(LogLevelName(level)) + " " + std::string(message));
    });
  }
  ~CapturedLog() { SetLogSink({}); }
  std::vector<std::string> lines() const {
    std::lock_guard lock(mu_);
    return lines_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
};

// A clock the test moves by hand.
struct FakeClock {
  Clock::time_point now = Clock::time_point() + 1h;
  std::function<Clock::time_point()> fn() {
    return [this] { return now; };
  }
};

TEST(RateLimitedLogTest, FoldsARepeatedLineIntoOneCountPerWindow) {
  CapturedLog captured;
  FakeClock clock;
  RateLimitedLog log(5s, clock.fn());
  for (int i = 0; i < 1000; ++i) {
    log.Log(LogLevel::kWarning, "accept: too many open files");
    clock.now += 1ms;  // 1 s in all: one window
  }
  EXPECT_EQ(captured.lines(), std::vector<std::string>{"warning accept: too many open files"});
  clock.now += 4s;  // past the window: the next repeat brings the count out
  log.Log(LogLevel::kWarning, "accept: too many open files");
  ASSERT_EQ(captured.lines().size(), 2u);
  EXPECT_EQ(captured.lines()[1],
            "warning accept: too many open files (repeated 1000 times in the last 5.0 s)");
  EXPECT_EQ(log.logged(), 2u);
  EXPECT_EQ(log.folded(), 1000u);
}

TEST(RateLimitedLogTest, ADifferentLineEndsTheFoldAndFlushReportsWhatIsPending) {
  CapturedLog captured;
  FakeClock clock;
  RateLimitedLog log(5s, clock.fn());
  log.Log(LogLevel::kInfo, "a");
  log.Log(LogLevel::kInfo, "a");
  log.Log(LogLevel::kInfo, "a");
  clock.now += 1s;
  log.Log(LogLevel::kInfo, "b");   // the count of "a" first, then "b"
  log.Log(LogLevel::kError, "b");  // another level is another line
  log.Log(LogLevel::kError, "b");
  log.Flush();  // within the window: nothing yet
  EXPECT_EQ(captured.lines().size(), 4u);
  clock.now += 5s;
  log.Flush();
  log.Flush();  // nothing pending any more
  EXPECT_EQ(captured.lines(), (std::vector<std::string>{
                                  "info a", "info a (repeated 2 times in the last 1.0 s)", "info b",
                                  "error b", "error b (repeated 1 time in the last 5.0 s)"}));
}

TEST(RateLimitedLogTest, ALineAfterAQuietWindowIsLoggedPlainly) {
  CapturedLog captured;
  FakeClock clock;
  RateLimitedLog log(5s, clock.fn());
  log.Log(LogLevel::kInfo, "vm refused");
  clock.now += 6s;
  log.Log(LogLevel::kInfo, "vm refused");
  EXPECT_EQ(captured.lines(), (std::vector<std::string>{"info vm refused", "info vm refused"}));
  log.Log(LogLevel::kInfo, "vm refused");
  {
    RateLimitedLog other(5s, clock.fn());
    other.Log(LogLevel::kInfo, "x");
    other.Log(LogLevel::kInfo, "x");
  }  // the destructor reports what is pending
  EXPECT_EQ(captured.lines().back(), "info x (repeated 1 time in the last 0.0 s)");
}

TEST(RateLimitedLogTest, ManyThreadsAtOnceLoseNoCount) {
  CapturedLog captured;
  RateLimitedLog log(1h);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) log.Log(LogLevel::kWarning, "same");
    });
  }
  for (auto& t : threads) t.join();
  log.Flush(/*force=*/true);
  EXPECT_EQ(log.folded(), 39999u);
  ASSERT_EQ(captured.lines().size(), 2u);
  EXPECT_NE(captured.lines()[1].find("repeated 39999 times"), std::string::npos);
}

TEST(RateLimitedLogTest, LinesBelowTheSinksLevelAreNotCounted) {
  CapturedLog captured;  // kInfo and above
  RateLimitedLog log;
  log.Log(LogLevel::kDebug, "noise");
  log.Log(LogLevel::kDebug, "noise");
  EXPECT_TRUE(captured.lines().empty());
  EXPECT_EQ(log.logged(), 0u);
  EXPECT_EQ(log.folded(), 0u);
}

}  // namespace
}  // namespace guestmem
