#!/usr/bin/env bash
# Installs what is missing, builds, and runs `gmem demo` with its built-in defaults.
# Arguments are passed to `gmem demo`.
source "$(dirname "$0")/lib.sh"
gm_install_missing_packages
gm_build release
exec "$GUESTMEM_ROOT/build/release/tools/gmem/gmem" demo "$@"
