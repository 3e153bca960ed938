#!/usr/bin/env bash
# Builds the libFuzzer targets (the fuzz preset: clang, ASan+UBSan) and runs each for a bounded
# time from its seed corpus in fuzz/corpus/<target>/.
#   scripts/fuzz.sh              60 seconds per target
#   scripts/fuzz.sh 600          10 minutes per target
#   scripts/fuzz.sh 60 trace_parse handshake_parse    only these targets
# Exits non-zero if any target crashes, leaks, times out or runs out of memory; the input that did
# it is left in build/fuzz/artifacts/<target>/. A crash with the stack of a known open one
# (fuzz/crashes/<target>/, see its README) is reported but not counted. Prints each target's
# executions. New inputs found
# go to build/fuzz/corpus/<target>/ (the tree's corpus is only read).
source "$(dirname "$0")/lib.sh"
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(handshake_parse handshake_receive uffd_events trace_parse vcpu_fault_frames packed_index
                                     remote_answer)

gm_install_missing_packages
gm_install_missing_packages "${GUESTMEM_FUZZ_PACKAGES[@]}"
gm_build fuzz
cd "$GUESTMEM_ROOT"

# The first two stack frames of a crash log that lie in the project's own code (not the fuzz
# target's): what tells one bug from another.
crash_signature() {
  grep -E '^ *#[0-9]+ ' "$1" | grep -oE "$GUESTMEM_ROOT/[^ ]+:[0-9]+" | grep -v "/fuzz/" |
    head -2 | sed "s|$GUESTMEM_ROOT/||" | tr '\n' ' '
}

# known_crash <target> <log>: the reproducer in fuzz/crashes/<target>/ that crashes with the same
# signature as <log>, if any. Reproducers that no longer crash are reported as fixed.
known_crash() {
  local target="$1" log="$2" sig known_log known_sig
  sig="$(crash_signature "$log")"
  [ -n "$sig" ] || return 1
  for repro in fuzz/crashes/"$target"/*; do
    [ -f "$repro" ] && [ "${repro%.md}" = "$repro" ] || continue
    known_log="$(mktemp)"
    if "build/fuzz/fuzz/${target}_fuzzer" "$repro" >"$known_log" 2>&1; then
      echo "fuzz: $repro no longer crashes: move it to fuzz/corpus/$target/" >&2
    else
      known_sig="$(crash_signature "$known_log")"
      if [ "$known_sig" = "$sig" ]; then
        rm -f "$known_log"
        echo "$repro"
        return 0
      fi
    fi
    rm -f "$known_log"
  done
  return 1
}

failed=0
summary=()
for target in "${targets[@]}"; do
  binary="build/fuzz/fuzz/${target}_fuzzer"
  work="build/fuzz/corpus/$target"
  artifacts="build/fuzz/artifacts/$target"
  log="build/fuzz/logs/$target.log"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  echo "fuzz: $target for ${seconds}s"
  dict=()
  for candidate in "fuzz/$target.dict" "fuzz/${target%%_*}.dict"; do
    if [ -f "$candidate" ]; then
      dict=(-dict="$candidate")
      break
    fi
  done
  status=0
  # -timeout: one input taking this long is a hang; -rss_limit_mb: the process's memory.
  "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${dict[@]}" -artifact_prefix="$artifacts/" "$work" "fuzz/corpus/$target" >"$log" 2>&1 ||
    status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  corpus="$(find "$work" -type f | wc -l)"
  if [ "$status" -ne 0 ] && known="$(known_crash "$target" "$log")"; then
    echo "fuzz: $target met a known open crash again ($known), not a new failure"
    summary+=("$(printf '%-20s %12s executions  %6s inputs  known crash %s' "$target" "${execs:-?}" "$corpus" "$known")")
  elif [ "$status" -ne 0 ]; then
    failed=1
    echo "fuzz: $target FAILED (exit $status); the log ends:"
    tail -40 "$log"
    ls "$artifacts"
    summary+=("$(printf '%-20s %12s executions  %6s inputs  FAILED' "$target" "${execs:-?}" "$corpus")")
  else
    summary+=("$(printf '%-20s %12s executions  %6s inputs  0 crashes' "$target" "${execs:-?}" "$corpus")")
  fi
done
echo "fuzz: ${seconds}s per target"
printf '%s\n' "${summary[@]}"
exit "$failed"
