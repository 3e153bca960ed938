// The restore report: one self-contained HTML page (inline SVG and CSS, nothing fetched) that
// draws what restores did, from their traces (restore_trace.h), one column per restore:
//   - pages installed over time, stacked by cause (fault, prefetch, fill);
//   - the distribution of fault service latencies (the buckets of LatencyBuckets);
//   - a map of guest memory: each cell a run of pages, coloured by what installed it first and
//     shaded by when (dark early, light late); grey cells were never installed.
// `gmem report TRACE` draws one restore; `gmem bench --report` its contestants side by side.
//
// Thread safety: a pure function.
#ifndef GUESTMEM_TOOLS_GMEM_REPORT_RESTORE_REPORT_H_
#define GUESTMEM_TOOLS_GMEM_REPORT_RESTORE_REPORT_H_

#include <string>
#include <vector>

#include "guestmem/restore_trace.h"

namespace guestmem::report {

struct ReportColumn {
  std::string title;  // "vm 3 (pid 4242)", "on-demand"
  RestoreTraceData trace;
};

std::string RenderRestoreReport(const std::string& title, const std::vector<ReportColumn>& columns);

}  // namespace guestmem::report

#endif  // GUESTMEM_TOOLS_GMEM_REPORT_RESTORE_REPORT_H_
