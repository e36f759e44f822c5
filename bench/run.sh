#!/usr/bin/env bash
# One command for the whole benchmark: installs QEMU's tools if they are missing
# (the same packages as scripts/install-deps.sh), builds qbackup in release mode,
# generates the workloads and runs every pair. Arguments go to bench/run.py
# (--quick, --only PATTERN, --runs N, --cache warm,cold, --dir DIR, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy qemu-system-x86_64 virsh libvirtd pkg-config; do
    if ! command -v "$t" >/dev/null 2>&1; then
        bash scripts/install-deps.sh
        break
    fi
done
exec python3 bench/run.py "$@"
