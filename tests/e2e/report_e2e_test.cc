// The restore report end to end: `gmem serve --trace-dir` writes a VM's restore trace, `gmem
// report` draws it as a self-contained HTML page, and headless Chromium renders that page to
// something that is not blank (the colours of what was drawn are in the screenshot). Bad input
// (a trace dir that cannot be used, a trace that is not one) gets a clear error.
#include <dirent.h>
#include <gtest/gtest.h>
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "guestmem/restore_trace.h"
#include "serve_fixture.h"
#include "testutil/test_vm.h"

namespace guestmem::e2e {
namespace {

using testutil::ReadFile;

std::vector<std::string> FilesIn(const std::string& dir, const std::string& suffix) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() > suffix.size() && name.ends_with(suffix)) out.push_back(dir + "/" + name);
  }
  closedir(d);
  return out;
}

struct Pixels {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

// Decodes a PNG with libpng; width 0 when it cannot.
Pixels ReadPng(const std::string& path) {
  Pixels out;
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) return out;
  image.format = PNG_FORMAT_RGB;
  out.rgb.resize(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, out.rgb.data(), 0, nullptr)) {
    png_image_free(&image);
    return {};
  }
  out.width = static_cast<int>(image.width);
  out.height = static_cast<int>(image.height);
  return out;
}

class ReportTest : public ServeTest {};

TEST_F(ReportTest, ARestoresTraceIsDrawnAndChromiumRendersItNotBlank) {
  const std::string traces = dir_ + "/traces";
  ASSERT_EQ(mkdir(traces.c_str(), 0755), 0);
  StartServer({"--trace-dir", traces});
  ExpectVmVerifies({"--workload", "sparse", "--threads", "2", "--verify"});
  ASSERT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  std::vector<std::string> files;
  Result<RestoreTraceData> trace = Error(ErrorCode::kNotFound, "no trace yet");
  // The trace is complete once the VM's handler is gone (its last block written).
  ASSERT_NE(server_->WaitForLine({"vm 1 (", "restore trace ", " complete"}, 60s), "")
      << server_->Output();
  files = FilesIn(traces, ".gmtrace");
  ASSERT_EQ(files.size(), 1u);
  trace = ReadRestoreTrace(files[0]);
  ASSERT_TRUE(trace) << trace.error().ToString();
  ASSERT_FALSE(trace->records.empty());
  EXPECT_EQ(trace->header.snapshot, snapshot_->path());
  EXPECT_NE(server_->Output().find("restore trace " + files[0]), std::string::npos);

  const std::string html = dir_ + "/restore.html";
  Subprocess report({GMEM_BINARY, "report", files[0], "-o", html}, dir_ + "/report.log");
  ASSERT_EQ(report.ExitCode(60s), 0) << report.Output();
  const std::string page = ReadFile(html);
  EXPECT_NE(page.find("<svg"), std::string::npos);
  EXPECT_NE(page.find("Pages installed over time"), std::string::npos);
  EXPECT_NE(page.find("Fault service latency"), std::string::npos);
  EXPECT_NE(page.find("Guest memory: what was installed when"), std::string::npos);
  // Self-contained: nothing to fetch (the only URL is SVG's namespace, which is never fetched).
  EXPECT_EQ(page.find("src="), std::string::npos);
  EXPECT_EQ(page.find("href="), std::string::npos);
  EXPECT_EQ(page.find("https://"), std::string::npos);

  const std::string chromium = "/usr/bin/chromium";
  if (access(chromium.c_str(), X_OK) != 0) GTEST_SKIP() << "no " << chromium;
  const std::string png = dir_ + "/restore.png";
  Subprocess browser({chromium, "--headless", "--no-sandbox", "--disable-gpu",
                      "--user-data-dir=" + dir_ + "/chromium", "--hide-scrollbars",
                      "--window-size=1100,1000", "--screenshot=" + png, "file://" + html},
                     dir_ + "/chromium.log");
  ASSERT_EQ(browser.ExitCode(180s), 0) << browser.Output();
  const Pixels shot = ReadPng(png);
  ASSERT_EQ(shot.width, 1100) << browser.Output();
  ASSERT_EQ(shot.height, 1000);
  size_t not_white = 0;
  size_t fault_coloured = 0;  // the fault colour of the charts, rgb(228,87,46)
  for (size_t i = 0; i + 2 < shot.rgb.size(); i += 3) {
    const int r = shot.rgb[i], g = shot.rgb[i + 1], b = shot.rgb[i + 2];
    if (r < 245 || g < 245 || b < 245) ++not_white;
    if (std::abs(r - 228) < 8 && std::abs(g - 87) < 8 && std::abs(b - 46) < 8) ++fault_coloured;
  }
  const size_t pixels = shot.rgb.size() / 3;
  EXPECT_GT(not_white, pixels / 20) << "the screenshot is (nearly) blank";
  EXPECT_GT(fault_coloured, 500u) << "the charts' fault colour is not in the screenshot";
}

TEST_F(ReportTest, BadTracesAndTraceDirsGetAClearError) {
  const std::string bad = dir_ + "/bad.gmtrace";
  std::ofstream(bad) << "not a trace at all";
  Subprocess report({GMEM_BINARY, "report", bad, "-o", dir_ + "/r.html"}, dir_ + "/report.log");
  EXPECT_EQ(report.ExitCode(60s), 1);
  EXPECT_NE(report.Output().find("gmem report: "), std::string::npos) << report.Output();
  EXPECT_NE(report.Output().find("not a restore trace"), std::string::npos) << report.Output();
  EXPECT_EQ(access((dir_ + "/r.html").c_str(), F_OK), -1) << "no page for a bad trace";

  Subprocess missing({GMEM_BINARY, "report", dir_ + "/none.gmtrace"}, dir_ + "/missing.log");
  EXPECT_EQ(missing.ExitCode(60s), 1);
  EXPECT_NE(missing.Output().find("none.gmtrace"), std::string::npos) << missing.Output();

  const std::vector<std::pair<std::string, std::string>> dirs = {
      {dir_ + "/no/such/dir", "No such file or directory"},
      {bad, "not a directory"},
  };
  for (const auto& [dir, why] : dirs) {
    Subprocess serve({GMEM_BINARY, "serve", socket_, snapshot_->path(), "--trace-dir", dir},
                     dir_ + "/serve-bad.log");
    EXPECT_EQ(serve.ExitCode(30s), 2) << dir;
    EXPECT_NE(serve.Output().find("--trace-dir '" + dir + "': " + why), std::string::npos)
        << serve.Output();
    std::remove((dir_ + "/serve-bad.log").c_str());
  }
}

}  // namespace
}  // namespace guestmem::e2e
