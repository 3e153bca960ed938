#include "guestmem/restore_trace.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <string>

#include "base/temp_dir.h"
#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "testutil/snapshot_file.h"
#include "testutil/test_vm.h"

namespace guestmem {
namespace {

using testutil::MapAnonymousVm;
using testutil::OpenSource;
using testutil::Serve;
using testutil::SnapshotFile;
using testutil::StartEngine;
using testutil::StatsWhen;
using testutil::TestVm;

std::string Bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void Write(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST(RestoreTraceTest, WhatIsWrittenIsReadBack) {
  TempDir dir;
  const std::string path = dir.File("t.gmtrace");
  {
    auto writer = RestoreTraceWriter::Create(path, {"vm 1", 42, "/snap", 1000, 123456789});
    ASSERT_TRUE(writer.has_value()) << writer.error().ToString();
    // More than a block's worth, so that both the block writes and the last flush are read.
    for (uint64_t i = 0; i < 5000; ++i) {
      (*writer)->Append({.time_ns = i * 10,
                         .page = i % 990,
                         .value = static_cast<uint32_t>(i % 10),
                         .type = static_cast<TraceRecordType>(1 + i % 3),
                         .way = static_cast<TraceWay>(i % 4)});
    }
    (*writer)->Append(
        {.time_ns = 50000, .page = 999, .value = 31000, .type = TraceRecordType::kFault});
  }
  auto trace = ReadRestoreTrace(path);
  ASSERT_TRUE(trace.has_value()) << trace.error().ToString();
  EXPECT_EQ(trace->header.vm, "vm 1");
  EXPECT_EQ(trace->header.pid, 42);
  EXPECT_EQ(trace->header.snapshot, "/snap");
  EXPECT_EQ(trace->header.pages, 1000u);
  EXPECT_EQ(trace->header.started_unix_ns, 123456789u);
  ASSERT_EQ(trace->records.size(), 5001u);
  EXPECT_EQ(trace->records[4321].page, 4321u % 990);
  EXPECT_EQ(trace->records[4321].way, static_cast<TraceWay>(4321 % 4));
  EXPECT_EQ(trace->records.back().type, TraceRecordType::kFault);
  EXPECT_EQ(trace->records.back().value, 31000u);
  // A file is never replaced.
  EXPECT_EQ(RestoreTraceWriter::Create(path, {}).error().code(), ErrorCode::kAlreadyExists);
}

TEST(RestoreTraceTest, MalformedTracesAreRefusedSayingWhatIsWrong) {
  TempDir dir;
  const std::string good = dir.File("good.gmtrace");
  {
    auto writer = RestoreTraceWriter::Create(good, {"vm 1", 1, "/s", 16, 0});
    ASSERT_TRUE(writer.has_value());
    (*writer)->Append(
        {.time_ns = 5, .page = 3, .value = 2, .type = TraceRecordType::kFaultInstall});
    (*writer)->Append({.time_ns = 9, .page = 3, .value = 700, .type = TraceRecordType::kFault});
  }
  const std::string bytes = Bytes(good);
  const size_t records = bytes.size() - 2 * kTraceRecordBytes;
  auto with = [&](size_t at, char value) {
    std::string b = bytes;
    b[at] = value;
    return b;
  };
  const std::map<std::string, std::string> cases = {
      {"", "no GMTRACE1 magic"},
      {"GMTRACE2" + bytes.substr(8), "no GMTRACE1 magic"},
      {bytes.substr(0, 10), "no GMTRACE1 magic"},
      {with(8, '\xff'), "does not fit"},
      {with(12, '['), "not the JSON object of a trace"},
      {bytes.substr(0, bytes.size() - 3), "partial record"},
      {with(records + 20, 9), "unknown type 9"},
      {with(records + 21, 7), "unknown way 7"},
      {with(records + 8, 15), "beyond the memory file's 16"},  // pages 15+2 of 16
      {with(records + kTraceRecordBytes, 1), "time goes backwards"},
  };
  for (const auto& [content, why] : cases) {
    const std::string path = dir.File("bad.gmtrace");
    Write(path, content);
    auto trace = ReadRestoreTrace(path);
    ASSERT_FALSE(trace.has_value()) << why;
    EXPECT_EQ(trace.error().code(), ErrorCode::kDataLoss) << why;
    EXPECT_NE(trace.error().context().find(why), std::string::npos) << trace.error().context();
  }
  EXPECT_EQ(ReadRestoreTrace(dir.File("none")).error().code(), ErrorCode::kNotFound);
  EXPECT_EQ(ReadRestoreTrace(dir.path()).error().code(), ErrorCode::kDataLoss);
}

// A handler's trace tells the same story as its statistics: a fault record per fault, and the
// pages of its install records add up to the pages it installed, by cause and by way.
TEST(RestoreTraceTest, AHandlersTraceAgreesWithItsStatistics) {
  TempDir dir;
  SnapshotFile snapshot(1024, [](uint64_t p) { return p % 4 == 1; });
  TestVm vm = MapAnonymousVm({snapshot.size()});
  auto engine = StartEngine(1);
  auto writer = RestoreTraceWriter::Create(dir.File("vm.gmtrace"),
                                           {"vm", 1, snapshot.path(), snapshot.pages(), 0});
  ASSERT_TRUE(writer.has_value());
  FaultHandlerOptions options;
  options.fill = FillMode::kAtFirstFault;
  options.trace = std::move(*writer);
  SpaceId id = Serve(*engine, vm, OpenSource(snapshot), options);
  for (uint64_t p = 0; p < 1024; p += 97) ASSERT_EQ(snapshot.CheckPage(p, vm.PageAt(p)), "");
  StatsWhen(*engine, id, [](const FaultStats& s) { return s.fill_finished_ns > 0; });
  const FaultStats stats = engine->RemoveSpace(id).value_or(FaultStats{});
  ASSERT_GT(stats.fill_finished_ns, 0u);
  options.trace.reset();  // the engine dropped the handler: the trace is flushed
  auto trace = ReadRestoreTrace(dir.File("vm.gmtrace"));
  ASSERT_TRUE(trace.has_value()) << trace.error().ToString();
  uint64_t faults = 0;
  std::map<TraceRecordType, uint64_t> by_cause;
  std::map<TraceWay, uint64_t> by_way;
  for (const TraceRecord& r : trace->records) {
    if (r.type == TraceRecordType::kFault) {
      ++faults;
      EXPECT_GT(r.value, 0u);
      continue;
    }
    by_cause[r.type] += r.value;
    by_way[r.way] += r.value;
  }
  EXPECT_EQ(faults, stats.faults_missing);
  EXPECT_EQ(by_cause[TraceRecordType::kFillInstall], stats.pages_filled);
  EXPECT_EQ(by_cause[TraceRecordType::kFaultInstall] + by_cause[TraceRecordType::kFillInstall],
            stats.pages_installed());
  EXPECT_EQ(by_way[TraceWay::kCopy], stats.pages_copied);
  EXPECT_EQ(by_way[TraceWay::kZero], stats.pages_zeroed);
}

}  // namespace
}  // namespace guestmem
