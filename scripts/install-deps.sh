#!/usr/bin/env bash
# Installs what qbackup needs to build and test on Debian: the C libraries it
# links (zlib, zstd, lz4) and QEMU's tools, the reference peer of the tests.
set -euo pipefail
packages=(pkg-config zlib1g-dev libzstd-dev liblz4-dev qemu-utils libnbd-bin)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y "${missing[@]}"
fi
