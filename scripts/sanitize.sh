#!/usr/bin/env bash
# The whole test suite under a sanitizer, in its own scratch path:
#   scripts/sanitize.sh address|thread [swift test flags...]
# AddressSanitizer (with LeakSanitizer) or ThreadSanitizer instrument the
# library, the qbackup binary and the tests; CLI tests bound the children's
# memory with the sanitizer's limits instead of ulimit -v (TestSupport/Bounded.swift).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: sanitize.sh address|thread}"
shift
case "$kind" in
    address) scratch=.build-asan ;;
    thread) scratch=.build-tsan ;;
    *) echo "sanitize.sh: address or thread, not '$kind'" >&2; exit 2 ;;
esac
export SWIFT_BACKTRACE=enable=no  # let the sanitizer report crashes
export LSAN_OPTIONS="suppressions=$PWD/scripts/sanitizers/lsan.supp:print_suppressions=0"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"
nice -n 19 swift build --build-tests --sanitize="$kind" --scratch-path "$scratch"
swift test --skip-build --sanitize="$kind" --scratch-path "$scratch" "$@"
