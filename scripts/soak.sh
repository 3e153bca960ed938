#!/usr/bin/env bash
# Installs what is missing, builds the release preset and runs the chaos soak (docs/soak.md).
#   scripts/soak.sh                      what CI runs: a minute of balloon storms, munmaps, forks,
#                                        kills and source I/O errors at once, with the handler's
#                                        defaults, on both page sizes
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
exec build/release/tools/gmem/gmem soak --seconds 60 --inject all "${huge[@]}"
