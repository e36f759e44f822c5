#!/usr/bin/env bash
# Builds the release binary and prints its path. It is self-contained: the Swift
# runtime and Foundation are linked in (only libc, libstdc++, zlib, libzstd and
# liblz4 come from the system), so it can be copied to a KVM host that has no
# Swift toolchain, and it starts faster than a dynamically linked build. It is stripped
# (symbols and debug info: ~30 MB of the ~95 MB), in place, so the path printed is the
# same as before. `--scratch-path DIR` builds in DIR instead of .build (CI builds it there
# while the debug build and tests hold .build's lock).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=()
if [ "${1:-}" = "--scratch-path" ]; then scratch=(--scratch-path "${2:?--scratch-path needs a folder}"); fi
swift build -c release --static-swift-stdlib "${scratch[@]}" --product qbackup >&2
bin="$(swift build -c release --static-swift-stdlib "${scratch[@]}" --show-bin-path)/qbackup"
strip "$bin"
echo "$bin"
