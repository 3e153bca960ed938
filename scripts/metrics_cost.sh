#!/usr/bin/env bash
# What --metrics costs a restore: gmem bench with and without --metrics, alternating A B A B (the
# order swapped every round). Both arms are polled at 10 Hz while they run (ten times Prometheus'
# usual rate): the `with` arm's metrics are scraped, the `without` arm's poller finds nobody.
# Prints each round's ratio of total median time (with / without), the median ratio over rounds
# and the median ratios by workload and contestant.
#   scripts/metrics_cost.sh [rounds] [extra gmem bench options...]
source "$(dirname "$0")/lib.sh"
rounds="${1:-7}"
shift || true
gm_install_missing_packages
gm_build release
gmem="$GUESTMEM_ROOT/build/release/tools/gmem/gmem"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bench=("$gmem" bench --json --size-mib 256 --rounds 5 --workloads sparse,random --threads 1
       --access read --contestants on-demand,learned,fault-all "$@")

# The sum over configurations and contestants of the median times, in ms.
total_ms() { jq '[.configs[].contestants[].median_ms] | add' "$1"; }
# "workload/contestant median_ms" lines.
each_ms() { jq -r '.configs[] | .workload as $w | .contestants[] | "\($w)/\(.name) \(.median_ms)"' "$1"; }

# run_arm with|without: one bench run, polled at 10 Hz meanwhile in both arms, so that the two
# differ only in the daemon's side. The `with` arm scrapes the bench's --metrics; the `without`
# arm's curl finds nobody at 127.0.0.1:1 (this machine's idle vCPUs wake slowly, and a poller
# that runs in one arm only keeps them awake for it alone: that is not what is measured).
run_arm() {
  local arm="$1" port="" scrapes=0 pid
  rm -f "$work/$arm.err"  # not the last run's port: the shell truncates it only in the child
  if [ "$arm" = with ]; then
    "${bench[@]}" --metrics 127.0.0.1:0 > "$work/$arm.json" 2> "$work/$arm.err" &
  else
    port=1
    "${bench[@]}" > "$work/$arm.json" 2> "$work/$arm.err" &
  fi
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    [ -z "$port" ] && [ -f "$work/$arm.err" ] &&
      port="$(sed -n 's|.*metrics at http://127.0.0.1:\([0-9]*\)/metrics.*|\1|p' "$work/$arm.err")"
    if [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/metrics" -o /dev/null; then
      scrapes=$((scrapes + 1))
    fi
    sleep 0.1
  done
  wait "$pid"
  echo "$scrapes" > "$work/$arm.scrapes"
}
run_without() { run_arm without; }
run_with() { run_arm with; }

run_without  # warm-up
ratios=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then run_without; run_with; else run_with; run_without; fi
  without="$(total_ms "$work/without.json")"
  with="$(total_ms "$work/with.json")"
  ratio="$(echo "$with / $without" | bc -l)"
  ratios+=("$ratio")
  join <(each_ms "$work/without.json" | sort) <(each_ms "$work/with.json" | sort) |
    awk '{print $1, $3 / $2}' >> "$work/each"
  printf 'round %d: without %.2f ms, with --metrics %.2f ms (%d scrapes): ratio %.4f\n' \
    "$round" "$without" "$with" "$(cat "$work/with.scrapes")" "$ratio"
done
median="$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')"
printf 'median ratio (with / without --metrics) over %d rounds: %.4f\n' "$rounds" "$median"
echo "median ratio over rounds, by workload/contestant:"
sort "$work/each" | awk '{r[$1] = r[$1] " " $2} END {for (k in r) print k, r[k]}' | sort |
  while read -r name values; do
    printf '  %-22s %.4f\n' "$name" "$(printf '%s\n' $values | sort -g |
      awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')"
  done
