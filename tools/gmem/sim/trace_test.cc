#include "sim/trace.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>

#include "base/fault_injection_os.h"
#include "base/temp_dir.h"

namespace guestmem::sim {
namespace {

TEST(TraceTest, ParsesAccessesCommentsAndBlankLines) {
  const char* text =
      "# recorded working set\n"
      "\n"
      "r 0x1000\n"
      "w 2000   # the heap\n"
      "\tr\t0XABCDEF\r\n"
      "   \n"
      "w 0\n"
      "r ffffffffffffffff";  // no newline at the end
  auto trace = ParseTrace(text);
  ASSERT_TRUE(trace.has_value()) << trace.error().ToString();
  const std::vector<TraceAccess> want = {{0x1000, false, 3},
                                         {0x2000, true, 4},
                                         {0xabcdef, false, 5},
                                         {0, true, 7},
                                         {0xffffffffffffffff, false, 8}};
  EXPECT_EQ(*trace, want);
}

TEST(TraceTest, EmptyTraceHasNoAccesses) {
  auto trace = ParseTrace("# nothing\n\n");
  ASSERT_TRUE(trace.has_value());
  EXPECT_TRUE(trace->empty());
}

TEST(TraceTest, BadLinesAreNamed) {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"r 0x10\nx 0x20\n", "trace line 2: expected 'r' or 'w', got 'x'"},
      {"read 0x20\n", "trace line 1: expected 'r' or 'w', got 'read'"},
      {"# c\n\nw\n", "trace line 3: missing offset after 'w'"},
      {"r zz\n", "trace line 1: offset 'zz' is not a hexadecimal number"},
      {"r 0x\n", "trace line 1: offset '0x' is not a hexadecimal number"},
      {"r -10\n", "trace line 1: offset '-10' is not a hexadecimal number"},
      {"r 12g\n", "trace line 1: offset '12g' is not a hexadecimal number"},
      {"r 0x1ffffffffffffffff\n", "trace line 1: offset '0x1ffffffffffffffff' does not fit"},
      {"r 10\nr 10 20\n", "trace line 2: unexpected text '20' after the offset"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    auto trace = ParseTrace(c.text);
    ASSERT_FALSE(trace.has_value());
    EXPECT_EQ(trace.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(trace.error().context().find(c.message), std::string::npos)
        << trace.error().ToString();
  }
}

TEST(TraceTest, FormatRoundTrips) {
  const std::vector<TraceAccess> accesses = {{0x1000, false, 1}, {0xdeadb000, true, 2}};
  const std::string text = FormatTrace(accesses);
  EXPECT_EQ(text, "r 0x1000\nw 0xdeadb000\n");
  auto parsed = ParseTrace(text);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(*parsed, accesses);
}

class TraceFileTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.empty()); }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  TempDir temp_;
  const std::string dir_ = temp_.path();
};

TEST_F(TraceFileTest, LoadsAFile) {
  // Larger than one read, so the loader must read on.
  std::vector<TraceAccess> many;
  for (uint32_t i = 0; i < 20000; ++i) many.push_back({uint64_t{i} * 4096, i % 3 == 0, i + 1});
  const std::string path = Write("big.trace", FormatTrace(many));
  auto loaded = LoadTrace(path);
  ASSERT_TRUE(loaded.has_value()) << loaded.error().ToString();
  EXPECT_EQ(*loaded, many);
}

TEST_F(TraceFileTest, ErrorsNameTheFile) {
  auto missing = LoadTrace(dir_ + "/missing.trace");
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
  EXPECT_NE(missing.error().context().find("missing.trace"), std::string::npos);

  const std::string bad = Write("bad.trace", "r 0x1000\nq 0x2000\n");
  auto parsed = LoadTrace(bad);
  ASSERT_FALSE(parsed.has_value());
  EXPECT_EQ(parsed.error().context(), bad + ": trace line 2: expected 'r' or 'w', got 'q'");

  FaultInjectionOs os;
  os.FailNext(FaultInjectionOs::Call::kRead, EIO);
  auto unreadable = LoadTrace(Write("ok.trace", "r 0\n"), &os);
  ASSERT_FALSE(unreadable.has_value());
  EXPECT_EQ(unreadable.error().code(), ErrorCode::kIoError);
  EXPECT_NE(unreadable.error().context().find("read trace"), std::string::npos);
}

}  // namespace
}  // namespace guestmem::sim
