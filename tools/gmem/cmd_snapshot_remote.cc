// gmem snapshot push|pull: packed snapshots to and from an object store (snapshot_transfer.h).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "guestmem/object_store.h"
#include "guestmem/snapshot_transfer.h"
#include "progress.h"

namespace guestmem::cli {
namespace {

struct TransferArgs {
  std::string from, to;
  std::string store = "chunks";
  unsigned threads = 8;
  bool json = false;
};

// Runs a push (`push`) or a pull, its URL `url_text`, and reports what it moved.
int RunTransfer(bool push, const TransferArgs& args, const std::string& url_text) {
  const char* command = push ? "push" : "pull";
  auto url = ObjectUrl::Parse(url_text);
  if (!url) return SnapshotFailed(command, url.error().ToString());
  auto store = ObjectStore::Create(ObjectStoreOptions::FromEnvironment());
  if (!store) return SnapshotFailed(command, store.error().ToString());
  // Chunks are counted as they go, from several threads.
  std::mutex mu;
  std::unique_ptr<Progress> progress;
  TransferOptions options{.store = args.store, .threads = args.threads};
  options.progress = [&](uint64_t done, uint64_t total) {
    std::lock_guard lock(mu);
    if (!progress) {
      progress = std::make_unique<Progress>(std::string("snapshot ") + command, "chunks", total,
                                            args.json);
    }
    progress->Update(done);
  };
  auto summary = push ? PushSnapshot(args.from, *url, **store, options)
                      : PullSnapshot(*url, args.to, **store, options);
  if (progress) progress->Clear();
  if (!summary) return SnapshotFailed(command, summary.error().ToString());
  if (args.json) {
    std::printf("%s\n", nlohmann::json{{"layers", summary->layers},
                                       {"chunks", summary->chunks},
                                       {"chunks_moved", summary->chunks_moved},
                                       {"bytes_moved", summary->bytes_moved}}
                            .dump(2)
                            .c_str());
  } else {
    std::printf("%s: %zu layer(s), %llu chunks, %llu %s (%.1f MiB); the others were there\n",
                summary->layers.front().c_str(), summary->layers.size(),
                static_cast<unsigned long long>(summary->chunks),
                static_cast<unsigned long long>(summary->chunks_moved),
                push ? "uploaded" : "downloaded",
                static_cast<double>(summary->bytes_moved) / (1 << 20));
  }
  return 0;
}

void AddCommonOptions(CLI::App* cmd, TransferArgs* args) {
  cmd->add_option("--threads", args->threads, "Chunks moved at once")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "Print JSON");
  cmd->footer(
      "The store is reached as the AWS CLI reaches it: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
      "AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL.");
}

}  // namespace

void RegisterRemoteSnapshotCommands(CLI::App& snapshot) {
  auto push_args = std::make_shared<TransferArgs>();
  CLI::App* push = snapshot.add_subcommand(
      "push",
      "Upload a packed snapshot and its layers to an object store, only the chunks it "
      "does not have yet");
  push->add_option("snapshot", push_args->from, "The packed snapshot")->required();
  push->add_option("url", push_args->to, "Where it goes: s3://BUCKET/KEY")->required();
  push->add_option("--store", push_args->store,
                   "The chunk store, relative to the snapshot's object (shared by the snapshots "
                   "pushed with the same store)")
      ->capture_default_str();
  AddCommonOptions(push, push_args.get());
  push->callback(
      [push_args] { CommandExitCode() = RunTransfer(/*push=*/true, *push_args, push_args->to); });

  auto pull_args = std::make_shared<TransferArgs>();
  CLI::App* pull = snapshot.add_subcommand(
      "pull",
      "Download a packed snapshot and its layers from an object store or a web server, "
      "only the chunks the local store does not have yet");
  pull->add_option("url", pull_args->from, "s3://BUCKET/KEY or http(s)://HOST/PATH")->required();
  pull->add_option("snapshot", pull_args->to, "The packed snapshot to write")->required();
  AddCommonOptions(pull, pull_args.get());
  pull->callback([pull_args] {
    CommandExitCode() = RunTransfer(/*push=*/false, *pull_args, pull_args->from);
  });
}

}  // namespace guestmem::cli
