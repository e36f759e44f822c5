#!/usr/bin/env bash
# Profiles one qbackup command the way the benchmark's notes were made:
#   1. strace -f -w -c: where the wall time goes in system calls (fsync, pread, pwrite);
#   2. valgrind --tool=callgrind: where the instructions go (self and inclusive, top functions).
#
#   bash bench/profile.sh NAME -- qbackup-args...
#   e.g. bash bench/profile.sh compare -- compare /tmp/qbackup-bench/workloads/quick-seed20240607/chain/top.qcow2 \
#                                                 /tmp/qbackup-bench/workloads/quick-seed20240607/chain/flat.qcow2
#
# Valgrind 3.19 (Debian 12) cannot read the DWARF 5 that Swift 6's clang emits
# ("unhandled dwarf2 abbrev form code 0x25"), so the binary is profiled from a
# copy without debug sections (objcopy --strip-debug): function names come from
# the symbol table. Under valgrind, CPUID hides SHA-NI, so BoringSSL's SHA-256
# takes its AVX path: SHA-256 costs ~5x more instructions there than natively.
# Use small (--quick) workloads: callgrind runs ~50x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; shift
[ "${1:-}" = "--" ] && shift
out="${QBACKUP_BENCH_DIR:-/tmp/qbackup-bench}/profiles"
mkdir -p "$out"
qb="$(swift build -c release --static-swift-stdlib --show-bin-path)/qbackup"
objcopy --strip-debug "$qb" "$out/qbackup-nodebug"
echo "== strace -w -c (wall time in system calls)"
strace -f -w -c -o "$out/$name.strace" "$out/qbackup-nodebug" "$@" >/dev/null || true
head -15 "$out/$name.strace"
echo "== callgrind (instructions)"
valgrind --tool=callgrind --callgrind-out-file="$out/$name.callgrind" "$out/qbackup-nodebug" "$@" >/dev/null 2>"$out/$name.valgrind.log" || true
grep "refs:" "$out/$name.valgrind.log" || true
echo "-- self"
callgrind_annotate "$out/$name.callgrind" 2>/dev/null | sed -n '/file:function/,$p' | sed -n 3,22p | cut -c1-200
echo "-- inclusive (qbackup's own functions)"
callgrind_annotate --inclusive=yes "$out/$name.callgrind" 2>/dev/null | sed -n '/file:function/,$p' \
    | grep -E "qbackup-nodebug" | sed -n 1,25p | cut -c1-200
echo "files: $out/$name.*  (callgrind_annotate --tree=caller $out/$name.callgrind for callers)"
