#!/usr/bin/env bash
# Restores from an object store against restores from local disk (docs/benchmarks.md, "Remote
# snapshots"): one packed snapshot with a learned working set, served by `gmem serve` from
#   local  — the packed file on local disk, evicted from the page cache before each restore;
#   cold   — s3:// on a single-node Ceph RGW on 127.0.0.1, with an empty chunk cache;
#   warm   — the same URL again, a new daemon, its chunk cache on disk from the cold restore.
# Each round restores once with each, in that order; a restore is one `gmem vmm-sim` reading the
# workload's pages (checked with --verify), timed from its start to its exit with the daemon
# already serving. Prints each round and the medians of the same-round ratios cold/local and
# warm/local.
#   scripts/remote_bench.sh [rounds] [size-mib] [workload] [chunk-kib] [fetch-threads]
#                                                  (default 7 128 sparse 256 8)
source "$(dirname "$0")/lib.sh"
rounds="${1:-7}"
size_mib="${2:-128}"
workload="${3:-sparse}"
chunk_kib="${4:-256}"
fetch_threads="${5:-8}"
gm_install_missing_packages
gm_build release
gmem="$GUESTMEM_ROOT/build/release/tools/gmem/gmem"
tools="$GUESTMEM_ROOT/../shared/tools/ceph-rgw"
work="$(mktemp -d)"
cleanup() {
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  "$tools/rgw-down.sh" "$work/rgw" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
eval "$("$tools/rgw-up.sh" "$work/rgw" 2>/dev/null)"
export AWS_ENDPOINT_URL="$S3_ENDPOINT" AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" \
       AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_REGION="$S3_REGION"
curl -q -sS -o /dev/null --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X PUT "$S3_ENDPOINT/bench"

now_ns() { date +%s%N; }
# serve WHAT CACHE_DIR: starts a daemon on $work/s.sock and waits until it serves.
serve() {
  rm -f s.sock
  "$gmem" serve "$work/s.sock" "$1" --cache-dir "$2" --no-keeper --fetch-threads "$fetch_threads" \
    >serve.log 2>&1 &
  daemon=$!
  for _ in $(seq 1 600); do grep -q "serving " serve.log && return 0; sleep 0.05; done
  echo "gmem serve did not start:" >&2; cat serve.log >&2; exit 1
}
stop() { kill "$daemon"; wait "$daemon" 2>/dev/null; daemon=; }
# restore: one VM, its wall time in ms on stdout.
restore() {
  local start end
  start=$(now_ns)
  "$gmem" vmm-sim --socket "$work/s.sock" --mem-file t.mem --workload "$workload" --verify \
    >vm.log 2>&1 || { echo "restore FAILED:" >&2; cat vm.log serve.log >&2; exit 1; }
  end=$(now_ns)
  echo $(( (end - start) / 1000000 ))
}
evict() { dd if="$1" iflag=nocache count=0 status=none; }

"$gmem" snapshot create t.mem --size-mib "$size_mib" --seed 1 >/dev/null
# Learn the workload's working set, and pack it along.
serve "$work/t.mem" "$work/learn"; restore >/dev/null; stop
"$gmem" snapshot pack t.mem t.gmp --cache-dir "$work/learn" --chunk-kib "$chunk_kib" >/dev/null
"$gmem" snapshot push t.gmp s3://bench/snapshots/t.gmp >/dev/null
ws="$("$gmem" snapshot inspect t.gmp --json | sed -n 's/.*"working_set_pages": \([0-9]*\).*/\1/p' | head -n 1)"
echo "snapshot: $size_mib MiB in $chunk_kib KiB chunks, workload $workload, working set ${ws:-?}" \
     "pages; $fetch_threads fetch threads; $rounds rounds"

cold_ratios=() warm_ratios=()
for r in $(seq 1 "$rounds"); do
  rm -rf cache-local cache-remote
  evict t.gmp
  serve "$work/t.gmp" "$work/cache-local"; local_ms=$(restore); stop
  serve s3://bench/snapshots/t.gmp "$work/cache-remote"; cold_ms=$(restore); stop
  serve s3://bench/snapshots/t.gmp "$work/cache-remote"; warm_ms=$(restore); stop
  cold_ratios+=("$(awk -v a="$cold_ms" -v b="$local_ms" 'BEGIN { printf "%.3f", a / b }')")
  warm_ratios+=("$(awk -v a="$warm_ms" -v b="$local_ms" 'BEGIN { printf "%.3f", a / b }')")
  echo "round $r: local (cold page cache) $local_ms ms, RGW cold cache $cold_ms ms," \
       "RGW warm cache $warm_ms ms; ratios ${cold_ratios[-1]} ${warm_ratios[-1]}"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median of same-round ratios: RGW cold / local $(median "${cold_ratios[@]}"), RGW warm / local $(median "${warm_ratios[@]}")"
