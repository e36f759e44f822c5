#!/usr/bin/env bash
# Builds qbackup in release mode and runs it on a sample disk made with QEMU's tools.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release
QB="$(swift build -c release --show-bin-path)/qbackup"
work="$(mktemp -d /tmp/qbackup-demo.XXXXXX)"
echo "== sample disk in $work: a base image and an overlay, made with qemu-img/qemu-io"
qemu-img create -q -f qcow2 "$work/base.qcow2" 256M
qemu-io -c "write -P 0xaa 0 16M" -c "write -z 32M 8M" "$work/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$work/top.qcow2" 256M
qemu-io -c "write -P 0xbb 4M 1M" -c "discard 8M 1M" "$work/top.qcow2" >/dev/null
echo "== qbackup info --backing-chain"
"$QB" info --backing-chain "$work/top.qcow2"
echo "== qbackup map"
"$QB" map "$work/top.qcow2"
echo "== qbackup flatten --format raw, then compare with the chain"
"$QB" flatten --format raw "$work/top.qcow2" "$work/flat.raw"
"$QB" compare "$work/top.qcow2" "$work/flat.raw"
echo "== done; files are in $work"
