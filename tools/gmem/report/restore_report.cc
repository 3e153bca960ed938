#include "report/restore_report.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <optional>

#include "guestmem/fault_stats.h"

namespace guestmem::report {
namespace {

constexpr int kWidth = 520;
constexpr int kPlotLeft = 56;  // room for the y axis' labels
constexpr int kPlotRight = 12;
constexpr int kTimeBins = 240;
constexpr int kMapColumns = 64;
constexpr int kMapMaxRows = 48;
constexpr int kCellWidth = 8;
constexpr int kCellHeight = 6;

// Causes of an install, in the order they are stacked, with their colours.
constexpr std::array<TraceRecordType, 3> kCauses = {TraceRecordType::kFaultInstall,
                                                    TraceRecordType::kPrefetchInstall,
                                                    TraceRecordType::kFillInstall};
constexpr std::array<const char*, 3> kCauseNames = {"fault", "prefetch", "fill"};
constexpr std::array<std::array<int, 3>, 3> kCauseRgb = {
    {{228, 87, 46}, {46, 134, 222}, {40, 167, 69}}};
constexpr std::array<const char*, 4> kWayNames = {"copy", "zero page", "continue", "populate"};

size_t CauseIndex(TraceRecordType type) {
  return type == TraceRecordType::kPrefetchInstall ? 1
         : type == TraceRecordType::kFillInstall   ? 2
                                                   : 0;
}

std::string Format(const char* format, double value) {
  char text[64];
  (void)std::snprintf(text, sizeof(text), format, value);
  return text;
}

std::string Escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string Rgb(const std::array<int, 3>& rgb, double lighten = 0) {
  auto mix = [&](int c) { return static_cast<int>(c + (255 - c) * lighten); };
  return "rgb(" + std::to_string(mix(rgb[0])) + "," + std::to_string(mix(rgb[1])) + "," +
         std::to_string(mix(rgb[2])) + ")";
}

// "1.5 ms", "820 µs", "3.2 s" for a duration in nanoseconds.
std::string Duration(double ns) {
  if (ns >= 1e9) return Format("%.2f s", ns / 1e9);
  if (ns >= 1e6) return Format("%.1f ms", ns / 1e6);
  if (ns >= 1e3) return Format("%.0f µs", ns / 1e3);
  return Format("%.0f ns", ns);
}

std::string BoundLabel(uint64_t ns) {
  if (ns >= 1'000'000'000) return Format("%.0fs", static_cast<double>(ns) / 1e9);
  if (ns >= 1'000'000) return Format("%.0fms", static_cast<double>(ns) / 1e6);
  return Format("%.0fµs", static_cast<double>(ns) / 1e3);
}

std::string Text(double x, double y, const std::string& text, const char* anchor = "start",
                 int size = 11) {
  return "<text x=\"" + Format("%.1f", x) + "\" y=\"" + Format("%.1f", y) + "\" font-size=\"" +
         std::to_string(size) + "\" text-anchor=\"" + anchor + "\">" + Escape(text) + "</text>";
}

struct Summary {
  uint64_t duration_ns = 0;
  uint64_t faults = 0;
  std::array<uint64_t, 3> by_cause{};
  std::array<uint64_t, 4> by_way{};
  std::vector<uint32_t> latencies;  // sorted
  uint64_t installed() const { return by_cause[0] + by_cause[1] + by_cause[2]; }
};

Summary Summarize(const RestoreTraceData& trace) {
  Summary s;
  for (const TraceRecord& r : trace.records) {
    s.duration_ns = std::max(s.duration_ns, r.time_ns);
    if (r.type == TraceRecordType::kFault) {
      ++s.faults;
      s.latencies.push_back(r.value);
      continue;
    }
    s.by_cause[CauseIndex(r.type)] += r.value;
    s.by_way[static_cast<size_t>(r.way)] += r.value;
  }
  std::sort(s.latencies.begin(), s.latencies.end());
  return s;
}

double Percentile(const std::vector<uint32_t>& sorted, double fraction) {
  if (sorted.empty()) return 0;
  const size_t at = std::min(sorted.size() - 1,
                             static_cast<size_t>(fraction * static_cast<double>(sorted.size())));
  return sorted[at];
}

// Pages installed over time, stacked by cause.
std::string Timeline(const RestoreTraceData& trace, const Summary& s) {
  constexpr int kHeight = 200, kTop = 10, kBottom = 30;
  const double plot_w = kWidth - kPlotLeft - kPlotRight;
  const double plot_h = kHeight - kTop - kBottom;
  const double end = static_cast<double>(std::max<uint64_t>(s.duration_ns, 1));
  std::array<std::array<double, kTimeBins>, 3> bins{};
  for (const TraceRecord& r : trace.records) {
    if (r.type == TraceRecordType::kFault) continue;
    const int bin =
        std::min(kTimeBins - 1, static_cast<int>(static_cast<double>(r.time_ns) / end * kTimeBins));
    bins[CauseIndex(r.type)][static_cast<size_t>(bin)] += r.value;
  }
  for (auto& cause : bins) {
    for (int i = 1; i < kTimeBins; ++i) cause[i] += cause[i - 1];
  }
  const double top = static_cast<double>(std::max<uint64_t>(s.installed(), 1));
  auto x = [&](int bin) { return kPlotLeft + plot_w * (bin + 1) / kTimeBins; };
  auto y = [&](double pages) { return kTop + plot_h * (1 - pages / top); };
  std::string svg = "<svg width=\"" + std::to_string(kWidth) + "\" height=\"" +
                    std::to_string(kHeight) + "\" role=\"img\">";
  svg += "<rect x=\"" + std::to_string(kPlotLeft) + "\" y=\"" + std::to_string(kTop) +
         "\" width=\"" + Format("%.0f", plot_w) + "\" height=\"" + Format("%.0f", plot_h) +
         "\" fill=\"#fafafa\" stroke=\"#ccc\"/>";
  std::array<double, kTimeBins> below{};
  for (size_t c = 0; c < kCauses.size(); ++c) {
    if (bins[c][kTimeBins - 1] == 0) continue;
    std::string points =
        Format("%.1f", static_cast<double>(kPlotLeft)) + "," + Format("%.1f", y(0));
    for (int i = 0; i < kTimeBins; ++i) {
      points += " " + Format("%.1f", x(i)) + "," + Format("%.1f", y(below[i] + bins[c][i]));
    }
    for (int i = kTimeBins - 1; i >= 0; --i) {
      points += " " + Format("%.1f", x(i)) + "," + Format("%.1f", y(below[i]));
    }
    svg += "<polygon points=\"" + points + "\" fill=\"" + Rgb(kCauseRgb[c], 0.15) + "\" stroke=\"" +
           Rgb(kCauseRgb[c]) + "\" stroke-width=\"1\"/>";
    for (int i = 0; i < kTimeBins; ++i) below[i] += bins[c][i];
  }
  for (int tick = 0; tick <= 2; ++tick) {
    const double pages = top * tick / 2;
    svg += Text(kPlotLeft - 4, y(pages) + 4, Format("%.0f", pages), "end", 10);
    svg += Text(kPlotLeft + plot_w * tick / 2, kHeight - kBottom + 14, Duration(end * tick / 2),
                tick == 0   ? "start"
                : tick == 2 ? "end"
                            : "middle",
                10);
  }
  svg += Text(kPlotLeft + plot_w / 2, kHeight - 2, "time since the VM connected", "middle", 10);
  svg += "</svg>";
  return svg;
}

// The distribution of fault service latencies.
std::string LatencyChart(const Summary& s) {
  constexpr int kHeight = 190, kTop = 10, kBottom = 40;
  const auto& bounds = LatencyBuckets::kBoundsNs;
  std::array<uint64_t, bounds.size() + 1> counts{};
  for (const uint32_t ns : s.latencies) {
    counts[static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), ns) -
                               bounds.begin())]++;
  }
  const double top =
      static_cast<double>(std::max<uint64_t>(*std::max_element(counts.begin(), counts.end()), 1));
  const double plot_w = kWidth - kPlotLeft - kPlotRight;
  const double plot_h = kHeight - kTop - kBottom;
  const double bar = plot_w / static_cast<double>(counts.size());
  std::string svg = "<svg width=\"" + std::to_string(kWidth) + "\" height=\"" +
                    std::to_string(kHeight) + "\" role=\"img\">";
  svg += "<rect x=\"" + std::to_string(kPlotLeft) + "\" y=\"" + std::to_string(kTop) +
         "\" width=\"" + Format("%.0f", plot_w) + "\" height=\"" + Format("%.0f", plot_h) +
         "\" fill=\"#fafafa\" stroke=\"#ccc\"/>";
  for (size_t i = 0; i < counts.size(); ++i) {
    const double h = plot_h * static_cast<double>(counts[i]) / top;
    const double bx = kPlotLeft + bar * static_cast<double>(i);
    if (counts[i] > 0) {
      svg += "<rect x=\"" + Format("%.1f", bx + 2) + "\" y=\"" + Format("%.1f", kTop + plot_h - h) +
             "\" width=\"" + Format("%.1f", bar - 4) + "\" height=\"" + Format("%.1f", h) +
             "\" fill=\"" + Rgb(kCauseRgb[0]) + "\"><title>" + std::to_string(counts[i]) +
             " faults</title></rect>";
    }
    const std::string label = i < bounds.size() ? "≤" + BoundLabel(bounds[i]) : ">1s";
    svg += "<text font-size=\"9\" text-anchor=\"end\" transform=\"translate(" +
           Format("%.1f", bx + bar / 2 + 3) + "," + Format("%.1f", kTop + plot_h + 6) +
           ") rotate(-50)\">" + Escape(label) + "</text>";
  }
  svg += Text(kPlotLeft - 4, kTop + 8, Format("%.0f", top), "end", 10);
  svg += Text(kPlotLeft - 4, kTop + plot_h, "0", "end", 10);
  svg += "</svg>";
  return svg;
}

// Guest memory, each cell a run of pages: coloured by what installed it first, lighter when later.
std::string MemoryMap(const RestoreTraceData& trace, const Summary& s) {
  const uint64_t pages = std::max<uint64_t>(trace.header.pages, 1);
  const uint64_t per_cell = (pages + kMapColumns * kMapMaxRows - 1) / (kMapColumns * kMapMaxRows);
  const uint64_t cells = (pages + per_cell - 1) / per_cell;
  const int rows = static_cast<int>((cells + kMapColumns - 1) / kMapColumns);
  struct First {
    uint64_t time_ns;
    size_t cause;
  };
  std::vector<std::optional<First>> first(cells);
  for (const TraceRecord& r : trace.records) {
    if (r.type == TraceRecordType::kFault || r.value == 0) continue;
    for (uint64_t cell = r.page / per_cell; cell <= (r.page + r.value - 1) / per_cell; ++cell) {
      if (!first[cell]) first[cell] = First{r.time_ns, CauseIndex(r.type)};
    }
  }
  const double end = static_cast<double>(std::max<uint64_t>(s.duration_ns, 1));
  const int height = rows * kCellHeight + 16;
  std::string svg = "<svg width=\"" + std::to_string(kWidth) + "\" height=\"" +
                    std::to_string(height) + "\" role=\"img\">";
  svg += "<rect x=\"0\" y=\"0\" width=\"" + std::to_string(kMapColumns * kCellWidth) +
         "\" height=\"" + std::to_string(rows * kCellHeight) + "\" fill=\"#e6e6e6\"/>";
  for (uint64_t cell = 0; cell < cells; ++cell) {
    if (!first[cell]) continue;
    const double when = static_cast<double>(first[cell]->time_ns) / end;
    svg += "<rect x=\"" + std::to_string((cell % kMapColumns) * kCellWidth) + "\" y=\"" +
           std::to_string((cell / kMapColumns) * kCellHeight) + "\" width=\"" +
           std::to_string(kCellWidth) + "\" height=\"" + std::to_string(kCellHeight) +
           "\" fill=\"" + Rgb(kCauseRgb[first[cell]->cause], 0.7 * when) + "\"/>";
  }
  svg += Text(0, rows * kCellHeight + 12,
              "one cell = " + std::to_string(per_cell) + " page(s) of 4 KiB, " +
                  std::to_string(pages) + " pages in all; grey: never installed",
              "start", 10);
  svg += "</svg>";
  return svg;
}

std::string Legend() {
  std::string out = "<p class=\"legend\">";
  for (size_t c = 0; c < kCauses.size(); ++c) {
    out +=
        "<span><i style=\"background:" + Rgb(kCauseRgb[c]) + "\"></i>" + kCauseNames[c] + "</span>";
  }
  return out + " (on the map: dark early, light late)</p>";
}

std::string Column(const ReportColumn& column) {
  const Summary s = Summarize(column.trace);
  std::string out = "<section><h2>" + Escape(column.title) + "</h2>";
  out += "<table><tr><th>snapshot</th><td>" + Escape(column.trace.header.snapshot) + "</td></tr>";
  out += "<tr><th>span</th><td>" + Duration(static_cast<double>(s.duration_ns)) + "</td></tr>";
  out += "<tr><th>pages installed</th><td>" + std::to_string(s.installed()) + " (";
  for (size_t c = 0; c < kCauses.size(); ++c) {
    out += std::string(c > 0 ? ", " : "") + kCauseNames[c] + " " + std::to_string(s.by_cause[c]);
  }
  out += "; ";
  for (size_t w = 0; w < kWayNames.size(); ++w) {
    out += std::string(w > 0 ? ", " : "") + kWayNames[w] + " " + std::to_string(s.by_way[w]);
  }
  out += ")</td></tr>";
  out += "<tr><th>faults</th><td>" + std::to_string(s.faults) + "; latency p50 " +
         Duration(Percentile(s.latencies, 0.5)) + ", p99 " +
         Duration(Percentile(s.latencies, 0.99)) + ", max " +
         Duration(s.latencies.empty() ? 0 : s.latencies.back()) + "</td></tr></table>";
  out += "<h3>Pages installed over time</h3>" + Timeline(column.trace, s);
  out += "<h3>Fault service latency</h3>" + LatencyChart(s);
  out += "<h3>Guest memory: what was installed when</h3>" + MemoryMap(column.trace, s);
  return out + "</section>";
}

}  // namespace

std::string RenderRestoreReport(const std::string& title,
                                const std::vector<ReportColumn>& columns) {
  std::string out =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + Escape(title) +
      "</title><style>"
      "body{font-family:sans-serif;margin:16px;color:#222;background:#fff}"
      "h1{font-size:20px}h2{font-size:16px;margin:4px 0}h3{font-size:13px;margin:12px 0 4px}"
      ".columns{display:flex;flex-wrap:wrap;gap:24px}"
      "section{border:1px solid #ddd;border-radius:6px;padding:10px;width:" +
      std::to_string(kWidth) +
      "px}"
      "table{font-size:12px;border-collapse:collapse}th{text-align:left;padding-right:8px;"
      "vertical-align:top}"
      ".legend span{margin-right:14px;font-size:12px}"
      ".legend i{display:inline-block;width:12px;height:12px;margin-right:4px;"
      "vertical-align:middle}"
      "</style></head><body><h1>" +
      Escape(title) + "</h1>" + Legend() + "<div class=\"columns\">";
  for (const ReportColumn& column : columns) out += Column(column);
  return out + "</div></body></html>\n";
}

}  // namespace guestmem::report
