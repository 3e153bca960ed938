#!/usr/bin/env bash
# Installs what is missing, builds the release preset and runs the chaos soak (docs/soak.md).
#   scripts/soak.sh                      what CI runs: 45 s of balloon storms, munmaps, forks and
#                                        kills with the handler's defaults on both page sizes,
#                                        then 15 s of I/O errors with munmaps, forks and kills
#   scripts/soak.sh --seconds 600 ...    any `gmem soak` options instead
# 2 MiB pages are reserved for the run when root can (vm.nr_hugepages goes back afterwards).
source "$(dirname "$0")/lib.sh"
gm_install_missing_packages
gm_build release
cd "$GUESTMEM_ROOT"
if [ $# -gt 0 ]; then
  exec build/release/tools/gmem/gmem soak "$@"
fi
huge=(--huge-pages)
[ "$(id -u)" -eq 0 ] && huge+=(--reserve-huge-pages 80)
build/release/tools/gmem/gmem soak --seconds 45 --inject balloon,munmap,fork,kill "${huge[@]}"
exec build/release/tools/gmem/gmem soak --seconds 15 --inject ioerror,munmap,fork,kill
