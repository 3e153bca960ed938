#!/usr/bin/env bash
# rgw_fixture.sh up|down DIR TOOLS -- the Ceph RGW that the object-store tests share (the ctest
# fixture remote.rgw_up / remote.rgw_down).
#
#   up:   starts RGW with TOOLS/rgw-up.sh into DIR/rgw and copies its DIR/rgw/s3.env to DIR/s3.env.
#         When it cannot (no tools, no packages, a start that fails), it writes the reason to
#         DIR/skip-reason instead and still exits 0: the tests skip with that reason rather than
#         the whole suite failing on a machine without Ceph.
#   down: stops it (TOOLS/rgw-down.sh, which signals only the pids it recorded) and clears DIR.
#
# An RGW left running by a run that was interrupted is stopped by the next `up`.
set -uo pipefail

[ $# -eq 3 ] || { echo "usage: $0 up|down DIR TOOLS" >&2; exit 2; }
action=$1 dir=$2 tools=$3

stop() {
    [ -d "$dir/rgw" ] || return 0
    if [ -x "$tools/rgw-down.sh" ]; then
        "$tools/rgw-down.sh" "$dir/rgw"
    else
        echo "rgw_fixture: $tools/rgw-down.sh is missing; cannot stop what is in $dir/rgw" >&2
        return 1
    fi
}

skip() {
    echo "$*" > "$dir/skip-reason"
    echo "rgw_fixture: RGW tests will skip: $*" >&2
    exit 0
}

case "$action" in
up)
    mkdir -p "$dir" || exit 1
    stop || exit 1
    rm -f "$dir/s3.env" "$dir/skip-reason" "$dir/rgw-up.log"
    [ -x "$tools/rgw-up.sh" ] || skip "no Ceph RGW tools: $tools/rgw-up.sh does not exist"
    # rgw-up.sh bounds itself (RGW_UP_TIMEOUT); ctest's TIMEOUT for this test is longer.
    RGW_UP_TIMEOUT=${RGW_UP_TIMEOUT:-150} "$tools/rgw-up.sh" "$dir/rgw" >/dev/null 2>"$dir/rgw-up.log"
    rc=$?
    if [ $rc -ne 0 ] || [ ! -s "$dir/rgw/s3.env" ]; then
        reason="rgw-up.sh failed (exit $rc): $(grep -m1 'ERROR' "$dir/rgw-up.log" || tail -n1 "$dir/rgw-up.log")"
        # A failed rgw-up.sh has stopped what it started and kept its logs for inspection; the
        # next `up` or `down` removes them.
        [ $rc -ne 0 ] || stop >/dev/null 2>&1
        skip "$reason (log: $dir/rgw-up.log)"
    fi
    cp "$dir/rgw/s3.env" "$dir/s3.env"
    cat "$dir/s3.env"
    ;;
down)
    [ -d "$dir" ] || exit 0
    stop
    rc=$?
    rm -f "$dir/s3.env" "$dir/skip-reason"
    exit $rc
    ;;
*)
    echo "usage: $0 up|down DIR TOOLS" >&2
    exit 2
    ;;
esac
