#!/usr/bin/env bash
# Sizes of packed snapshots against zstd and against the ideal, measured on demo memory files
# (docs/benchmarks.md, "Packed snapshots"):
#   1. one snapshot: `gmem snapshot pack` (zstd -3, lz4) against `zstd -3` of the whole raw file;
#   2. ten snapshots that each differ from one template in 5% of their pages, scattered:
#      as layers over the packed template, and as full snapshots in one chunk store, against the
#      ideal (the packed template plus each snapshot's changed pages compressed by zstd -3).
# Every packed snapshot is unpacked again and compared with its raw file byte for byte.
#   scripts/snapshot_sizes.sh [size-mib]     (default 256)
source "$(dirname "$0")/lib.sh"
size_mib="${1:-256}"
gm_install_missing_packages
gm_install_missing_packages zstd
gm_build release
gmem="$GUESTMEM_ROOT/build/release/tools/gmem/gmem"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
bytes() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
same() { "$gmem" snapshot unpack "$1" back.mem --quiet && cmp -s back.mem "$2" && rm back.mem; }

"$gmem" snapshot create t.mem --size-mib "$size_mib" --seed 1 >/dev/null
zstd -3 -q -f t.mem -o t.zst
echo "one snapshot of $size_mib MiB: zstd -3 of the whole file $(mib "$(bytes t.zst)") MiB"
for codec in "zstd --level 3" "zstd --level 1" "lz4 --level 1"; do
  for chunk in 64 256 1024 4096; do
    # shellcheck disable=SC2086
    out="$("$gmem" snapshot pack t.mem t.gmp --codec $codec --chunk-kib "$chunk" --no-working-set \
             --threads 0 --json)"
    same t.gmp t.mem || { echo "round trip FAILED" >&2; exit 1; }
    mbs="$(echo "$out" | sed -n 's/.*"mb_per_second": \([0-9.]*\).*/\1/p')"
    echo "  pack --codec $codec --chunk-kib $chunk: $(mib "$(bytes t.gmp)") MiB," \
         "$(ratio "$(bytes t.gmp)" "$(bytes t.zst)")x zstd -3, $(printf %.0f "$mbs") MB/s"
  done
done

"$gmem" snapshot pack t.mem t.gmp --no-working-set >/dev/null
template="$(bytes t.gmp)"
ideal="$template"
layers="$template"
for i in $(seq 1 10); do
  "$gmem" snapshot create "d$i.mem" --from t.mem --change 0.05 --seed "$((100 + i))" --diff-only \
    >/dev/null
  "$gmem" snapshot create "v$i.mem" --from t.mem --change 0.05 --seed "$((100 + i))" >/dev/null
  zstd -3 -q -f "d$i.mem" -o "d$i.zst"
  ideal=$((ideal + $(bytes "d$i.zst")))
  "$gmem" snapshot pack "d$i.mem" "l$i.gmp" --parent t.gmp --no-working-set >/dev/null
  layers=$((layers + $(bytes "l$i.gmp")))
  same "l$i.gmp" "v$i.mem" || { echo "layer $i round trip FAILED" >&2; exit 1; }
  mkdir -p full
  "$gmem" snapshot pack "v$i.mem" "full/v$i.gmp" --store store --no-working-set >/dev/null
  same "full/v$i.gmp" "v$i.mem" || { echo "store $i round trip FAILED" >&2; exit 1; }
done
"$gmem" snapshot pack t.mem full/t.gmp --store store --no-working-set >/dev/null
store=$(( $(du -sb store | cut -f1) + $(du -sb full | cut -f1) ))
echo "ten snapshots, each 5% of pages changed from the template (scattered):"
echo "  ideal (packed template + each one's changed pages, zstd -3): $(mib "$ideal") MiB"
echo "  as layers over the packed template: $(mib "$layers") MiB, $(ratio "$layers" "$ideal")x the ideal"
echo "  as full snapshots in one chunk store: $(mib "$store") MiB, $(ratio "$store" "$ideal")x the ideal"
echo "every packed snapshot unpacked byte-identical to its raw file"
