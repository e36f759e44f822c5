#!/usr/bin/env bash
# The whole test suite: unit, interop (QEMU as the oracle) and CLI tests.
# Needs qemu-img, qemu-io, qemu-nbd and nbdinfo (scripts/install-deps.sh); tests fail, never skip, without them.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --build-tests
# qbackup(1) for ManualTests, made while the build folder's lock is free (the
# generate-manual plugin waits for it, and `swift test` holds it).
bash scripts/man-page.sh > /dev/null
swift test --skip-build "$@"
