// The command line's own observability: `gmem bench --report` draws guestmem's contestants side by
// side, and the progress lines of bench and snapshot create show on a terminal (a pty made by
// script(1)) but never when the output is a file or with --json.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "base/temp_dir.h"
#include "testutil/subprocess.h"

namespace guestmem::e2e {
namespace {

using namespace std::chrono_literals;
using testutil::ReadFile;
using testutil::Subprocess;

std::string ShellQuote(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& a : argv) out += (out.empty() ? "'" : " '") + a + "'";
  return out;
}

const std::vector<std::string> kSmallBench = {GMEM_BINARY, "bench", "--size-mib",  "16",
                                              "--rounds",  "1",     "--workloads", "sparse",
                                              "--threads", "1",     "--access",    "read"};

TEST(ToolsObservabilityTest, BenchReportDrawsGuestmemsContestantsSideBySide) {
  TempDir dir;
  std::vector<std::string> argv = kSmallBench;
  const std::string html = dir.File("bench.html");
  argv.insert(argv.end(), {"--contestants", "file,on-demand,fault-all", "--report", html});
  Subprocess bench(argv, dir.File("bench.log"));
  ASSERT_EQ(bench.ExitCode(300s), 0) << bench.Output();
  const std::string page = ReadFile(html);
  EXPECT_NE(page.find("<h1>gmem bench: sparse, 1 thread, reads, 16 MiB</h1>"), std::string::npos);
  const size_t on_demand = page.find("<h2>guestmem on-demand</h2>");
  const size_t fault_all = page.find("<h2>guestmem fault-all</h2>");
  ASSERT_NE(on_demand, std::string::npos);
  ASSERT_NE(fault_all, std::string::npos);
  EXPECT_LT(on_demand, fault_all) << "in the order given";
  EXPECT_EQ(page.find("File backend"), std::string::npos) << "no trace, no column";
  EXPECT_NE(page.find(" fill "), std::string::npos);
  EXPECT_NE(bench.Output().find("report of its first round: " + html), std::string::npos);
}

TEST(ToolsObservabilityTest, ProgressShowsOnATerminalOnly) {
  if (access("/usr/bin/script", X_OK) != 0) GTEST_SKIP() << "no script(1) to make a terminal";
  TempDir dir;
  // On a terminal: the line is drawn (and erased at the end).
  Subprocess tty(
      {"/usr/bin/script", "-qec",
       ShellQuote({GMEM_BINARY, "snapshot", "create", "--size-mib", "64", dir.File("a.mem")}),
       "/dev/null"},
      dir.File("tty.log"));
  ASSERT_EQ(tty.ExitCode(120s), 0) << tty.Output();
  EXPECT_NE(tty.Output().find("\rsnapshot create  64/64 MiB 100%"), std::string::npos)
      << tty.Output();
  EXPECT_NE(tty.Output().find("\r\033[K"), std::string::npos) << "erased when done";
  // Into a file: nothing but the summary.
  Subprocess file({GMEM_BINARY, "snapshot", "create", "--size-mib", "64", dir.File("b.mem")},
                  dir.File("file.log"));
  ASSERT_EQ(file.ExitCode(120s), 0) << file.Output();
  EXPECT_EQ(file.Output().find('\r'), std::string::npos) << file.Output();
  EXPECT_EQ(file.Output().find("MiB 100%"), std::string::npos) << file.Output();

  // bench on a terminal counts its runs; with --json it stays quiet there too.
  std::vector<std::string> bench = kSmallBench;
  bench.insert(bench.end(), {"--contestants", "on-demand,floor"});
  Subprocess shown({"/usr/bin/script", "-qec", ShellQuote(bench), "/dev/null"},
                   dir.File("bench-tty.log"));
  ASSERT_EQ(shown.ExitCode(300s), 0) << shown.Output();
  EXPECT_NE(shown.Output().find("\rbench  "), std::string::npos) << shown.Output();
  EXPECT_NE(shown.Output().find(" runs "), std::string::npos) << shown.Output();
  bench.push_back("--json");
  Subprocess json({"/usr/bin/script", "-qec", ShellQuote(bench), "/dev/null"},
                  dir.File("bench-json.log"));
  ASSERT_EQ(json.ExitCode(300s), 0) << json.Output();
  EXPECT_EQ(json.Output().find("\rbench  "), std::string::npos) << json.Output();
  EXPECT_NE(json.Output().find("\"configs\""), std::string::npos) << json.Output();
}

}  // namespace
}  // namespace guestmem::e2e
