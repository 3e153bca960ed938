#!/usr/bin/env bash
# Installs what is missing, builds the release preset and runs the chaos soak (docs/soak.md).
#   scripts/soak.sh                      what CI runs: 60 s of every injection the fault handler
#                                        passes today, one page per fault, both page sizes
#   scripts/soak.sh --seconds 600 ...    any `gmem soak` options instead
# 2 MiB pages are reserved for the run when root can (vm.nr_hugepages goes back afterwards).
source "$(dirname "$0")/lib.sh"
gm_install_missing_packages
gm_build release
cd "$GUESTMEM_ROOT"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--seconds 60 --inject balloon,kill,ioerror --fault-around-kib 4 --huge-pages)
  [ "$(id -u)" -eq 0 ] && args+=(--reserve-huge-pages 80)
fi
exec build/release/tools/gmem/gmem soak "${args[@]}"
