#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite.
#   scripts/test.sh            release build
#   scripts/test.sh asan       AddressSanitizer + UndefinedBehaviorSanitizer build
#   scripts/test.sh tsan       ThreadSanitizer build
# Extra arguments after the preset go to ctest (e.g. -R page_state, -L e2e).
source "$(dirname "$0")/lib.sh"
preset="${1:-release}"
shift || true
gm_install_missing_packages
gm_build "$preset"
cd "$GUESTMEM_ROOT"
ctest --preset "$preset" "$@"
