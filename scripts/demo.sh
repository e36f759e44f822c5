#!/usr/bin/env bash
# Builds qbackup in release mode and runs the nightly workflow on a sample disk
# made with QEMU's tools: a full backup, changes, incremental backups, a restore
# of an earlier point in time checked against what the disk held then, verify,
# and retention. Everything happens in a fresh temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
# QBACKUP names an installed binary to run the demo with (CI: the .deb's); else a release build.
QB="${QBACKUP:-$(bash scripts/build-release.sh)}"
work="$(mktemp -d /tmp/qbackup-demo.XXXXXX)"
disk="$work/vm.qcow2"
repo="$work/backups/vm"
step() { printf '\n== %s\n' "$*"; }

step "a 1 GiB sample disk with 64 MiB of data (qemu-img, qemu-io)"
qemu-img create -q -f qcow2 "$disk" 1G
qemu-io -c "write -P 0xaa 0 48M" -c "write -P 0xbb 512M 16M" "$disk" >/dev/null
"$QB" info "$disk"

step "night 1: full backup (the tracking bitmap starts in the disk)"
"$QB" backup "$disk" --repo "$repo"
qemu-img convert -O raw "$disk" "$work/night1.raw"

step "day 2: the VM writes 3 MiB and zeroes 1 MiB; night 2: incremental backup"
qemu-io -c "write -P 0xcc 1M 2M" -c "write -P 0xdd 700M 1M" -c "write -z 520M 1M" "$disk" >/dev/null
"$QB" bitmap list "$disk" 2>/dev/null || true
"$QB" backup "$disk" --repo "$repo" --dry-run
"$QB" backup "$disk" --repo "$repo"
qemu-img convert -O raw "$disk" "$work/night2.raw"

step "day 3: more writes; night 3: incremental backup, zstd-compressed"
qemu-io -c "write -P 0xee 100M 4M" "$disk" >/dev/null
"$QB" backup "$disk" --repo "$repo" --compress zstd

step "the repository"
"$QB" list "$repo"

step "restore night 2 (layer 1) and compare with what the disk held then"
"$QB" restore "$repo" --at 1 --to "$work/restored-night2.qcow2"
qemu-img compare "$work/restored-night2.qcow2" "$work/night2.raw"

step "verify every layer, and that the bitmap missed no write since night 3"
"$QB" verify "$repo" --image "$disk"

step "retention: keep the last 2 points; night 2 is still point 1 and restores the same bytes"
"$QB" merge "$repo" --keep 2
"$QB" list "$repo"
"$QB" restore "$repo" --at 1 --to "$work/night2-after-merge.raw" --format raw
qemu-img compare "$work/night2-after-merge.raw" "$work/night2.raw"

step "done; everything is in $work"
