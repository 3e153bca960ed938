// gmem report TRACE... -o restore.html: draws restore traces (gmem serve --trace-dir) as one
// self-contained HTML page, one column per trace.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "guestmem/restore_trace.h"
#include "report/restore_report.h"

namespace guestmem::cli {
namespace {

struct ReportArgs {
  std::vector<std::string> traces;
  std::string output = "restore.html";
  std::string title = "Restore report";
};

int RunReport(const ReportArgs& args) {
  std::vector<report::ReportColumn> columns;
  for (const std::string& path : args.traces) {
    auto trace = ReadRestoreTrace(path);
    if (!trace) {
      std::fprintf(stderr, "gmem report: %s\n", trace.error().ToString().c_str());
      return 1;
    }
    const std::string title = trace->header.vm;
    columns.push_back({title, std::move(*trace)});
  }
  std::ofstream out(args.output, std::ios::binary | std::ios::trunc);
  out << report::RenderRestoreReport(args.title, columns);
  out.close();
  if (!out) {
    std::fprintf(stderr, "gmem report: cannot write %s\n", args.output.c_str());
    return 1;
  }
  std::printf("wrote %s (%zu restore(s))\n", args.output.c_str(), columns.size());
  return 0;
}

}  // namespace

void RegisterReportCommand(CLI::App& app) {
  auto args = std::make_shared<ReportArgs>();
  CLI::App* cmd = app.add_subcommand(
      "report", "Draw restore traces (gmem serve --trace-dir) as one self-contained HTML page");
  cmd->add_option("traces", args->traces, "Restore trace files (.gmtrace), one column each")
      ->required();
  cmd->add_option("-o,--output", args->output, "The HTML file to write")->capture_default_str();
  cmd->add_option("--title", args->title, "The page's title")->capture_default_str();
  cmd->callback([args] { CommandExitCode() = RunReport(*args); });
}

}  // namespace guestmem::cli
