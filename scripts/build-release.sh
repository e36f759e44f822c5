#!/usr/bin/env bash
# Builds the release binary and prints its path. It is self-contained: the Swift
# runtime and Foundation are linked in (only libc, libstdc++, zlib, libzstd and
# liblz4 come from the system), so it can be copied to a KVM host that has no
# Swift toolchain, and it starts faster than a dynamically linked build. It is stripped
# (symbols and debug info: ~30 MB of the ~95 MB), in place, so the path printed is the
# same as before.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --static-swift-stdlib --product qbackup >&2
bin="$(swift build -c release --static-swift-stdlib --show-bin-path)/qbackup"
strip "$bin"
echo "$bin"
