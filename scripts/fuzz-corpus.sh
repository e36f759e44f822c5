#!/usr/bin/env bash
# Generates the fuzz seed corpus from small images made by QEMU's tools:
#   scripts/fuzz-corpus.sh OUTDIR
# writes OUTDIR/image/*.qcow2 (qcow2 v2/v3, cluster sizes 512/4k/64k, extended
# L2, zlib/zstd compressed clusters, snapshots, bitmaps, backing references,
# refcount widths, lazy refcounts, an external data file reference),
# OUTDIR/bitmaps/* (the images that carry bitmaps), OUTDIR/manifest/*.json and
# OUTDIR/repository/* (small repositories made by qbackup itself, each packed as
# one file: records of u16 name length, name, u32 length, bytes; big-endian) and
# OUTDIR/stream/* (replication streams of those repositories, `qbackup send`).
# The repositories need the qbackup binary: $QBACKUP, else a debug build.
# Virtual sizes are small so every seed stays at most a few hundred KB.
set -euo pipefail
out="${1:?usage: fuzz-corpus.sh OUTDIR}"
mkdir -p "$out/image" "$out/bitmaps" "$out/write" "$out/manifest" "$out/repository" "$out/stream"
work="$(mktemp -d /tmp/qbackup-seeds.XXXXXX)"
trap 'rm -rf "$work"' EXIT

img() { # NAME SIZE OPTIONS [qemu-io commands...]
    local name="$1" size="$2" opts="$3"
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$work/$name.qcow2" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if [ ${#args[@]} -gt 0 ]; then qemu-io -f qcow2 "${args[@]}" "$work/$name.qcow2" >/dev/null; fi
}

# Data pattern, a zeroed range, a discarded range and a partial cluster at the end.
rw=("write -P 0x11 0 3k" "write -P 0x22 9k 5k" "write -z 20k 4k" "write -P 0x33 40k 1k" "discard 40k 512")

img v2-512 64k "compat=0.10,cluster_size=512" "${rw[@]}"
img v2-4k 256k "compat=0.10,cluster_size=4096" "${rw[@]}"
img v2-64k 1M "compat=0.10,cluster_size=65536" "write -P 0x44 0 4k"
img v3-512 64k "cluster_size=512" "${rw[@]}"
img v3-4k 256k "cluster_size=4096" "${rw[@]}"
img v3-64k 1M "cluster_size=65536" "write -P 0x55 0 4k" "write -z 64k 64k"
img v3-empty 1M "cluster_size=4096"
img v3-odd-size 100001 "cluster_size=512" "write -P 0x66 99840 161"
img extl2-16k 512k "cluster_size=16384,extended_l2=on" "write -P 0x77 0 512" "write -P 0x78 3k 1k" "write -z 8k 512"
img extl2-64k 1M "cluster_size=65536,extended_l2=on" "write -P 0x79 2k 2k" "write -z 64k 4k"
img refcount1 64k "cluster_size=512,refcount_bits=1" "${rw[@]}"
img refcount8 64k "cluster_size=512,refcount_bits=8" "${rw[@]}"
img refcount64 64k "cluster_size=512,refcount_bits=64" "${rw[@]}"
img lazy 64k "cluster_size=512,lazy_refcounts=on" "${rw[@]}"
img zlib 64k "cluster_size=4096,compression_type=zlib" "write -c -P 0x5a 0 4k" "write -c -P 0x5b 8k 4k" "write -P 0x5c 4k 4k"
img zstd 64k "cluster_size=4096,compression_type=zstd" "write -c -P 0x6a 0 4k" "write -c -P 0x6b 8k 4k" "write -P 0x6c 4k 4k"
img zlib-512 16k "cluster_size=512" "write -c -P 0x7a 0 512" "write -c -P 0x7b 1k 512"
img snapshots 64k "cluster_size=512" "write -P 0x01 0 1k"
qemu-img snapshot -c first "$work/snapshots.qcow2"
qemu-io -f qcow2 -c "write -P 0x02 512 1k" "$work/snapshots.qcow2" >/dev/null
qemu-img snapshot -c second "$work/snapshots.qcow2"
img snapshots-v2 64k "compat=0.10,cluster_size=512" "write -P 0x03 0 1k"
qemu-img snapshot -c only "$work/snapshots-v2.qcow2"
img base 64k "cluster_size=512" "write -P 0x0b 0 4k"
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 "$work/overlay.qcow2" 64k
qemu-io -f qcow2 -c "write -P 0x0c 1k 1k" "$work/overlay.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 -b base.qcow2 -F qcow2 "$work/overlay-v2.qcow2" 64k
qemu-img create -q -f raw "$work/data.raw" 64k
# qemu-img opens a relative data_file name from its working directory: create it from $work.
(cd "$work" && qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw,data_file_raw=on datafile.qcow2 64k)

# Bitmaps: enabled and disabled, several granularities, dirty ranges written through qemu-io.
img bitmaps-512 64k "cluster_size=512" "write -P 0x21 0 1k"
qemu-img bitmap --add "$work/bitmaps-512.qcow2" b0
qemu-img bitmap --add -g 4096 "$work/bitmaps-512.qcow2" b1
qemu-img bitmap --add --disable "$work/bitmaps-512.qcow2" off
qemu-io -f qcow2 -c "write -P 0x22 5k 3k" -c "write -P 0x23 40k 512" "$work/bitmaps-512.qcow2" >/dev/null
img bitmaps-4k 256k "cluster_size=4096" "write -P 0x31 0 4k"
qemu-img bitmap --add -g 65536 "$work/bitmaps-4k.qcow2" coarse
qemu-img bitmap --add -g 512 "$work/bitmaps-4k.qcow2" fine
qemu-io -f qcow2 -c "write -P 0x32 100k 8k" "$work/bitmaps-4k.qcow2" >/dev/null
img bitmaps-extl2 512k "cluster_size=16384,extended_l2=on" "write -P 0x41 0 1k"
qemu-img bitmap --add "$work/bitmaps-extl2.qcow2" daily
qemu-io -f qcow2 -c "write -P 0x42 20k 2k" "$work/bitmaps-extl2.qcow2" >/dev/null
img bitmaps-32k 1M "cluster_size=32768"
qemu-img bitmap --add "$work/bitmaps-32k.qcow2" nightly
qemu-io -f qcow2 -c "write -P 0x43 128k 4k" "$work/bitmaps-32k.qcow2" >/dev/null

for f in "$work"/*.qcow2; do
    size=$(stat -c %s "$f")
    if [ "$size" -gt $((512 * 1024)) ]; then echo "fuzz-corpus: $f is $size bytes, too big for a seed" >&2; exit 1; fi
    cp "$f" "$out/image/"
done
cp "$work"/bitmaps-*.qcow2 "$out/bitmaps/"
mkdir -p "$out/write" && cp "$out/image/"*.qcow2 "$out/write/"

# Version 1 manifests: layer 0 full, incrementals after it, an optional pending merge.
sha="$(printf 'a%.0s' {1..64})"
layer() { # FILE KIND
    printf '{"file":"%s","kind":"%s","created":"2024-05-01T02:00:00Z","bytes-copied":65536,"file-size":262144,"virtual-size":1073741824,"sha256":"%s"}' "$1" "$2" "$sha"
}
head='"format":"qbackup-repository","version":1,"id":"0123456789abcdef","virtual-size":1073741824,"cluster-size":65536,"bitmap":"qbackup-0123456789abcdef","source":"/var/lib/images/disk.qcow2"'
printf '{%s,"layers":[]}\n' "$head" >"$out/manifest/empty.json"
printf '{%s,"layers":[%s]}\n' "$head" "$(layer full-0000.qcow2 full)" >"$out/manifest/full.json"
printf '{%s,"layers":[%s,%s,%s]}\n' "$head" "$(layer full-0000.qcow2 full)" "$(layer inc-0001.qcow2 incremental)" \
    "$(layer inc-0002.qcow2 incremental)" >"$out/manifest/chain.json"
printf '{%s,"layers":[%s,%s,%s],"pending-merge":{"file":"inc-0002.qcow2","sha256":"%s","fileSize":1,"folded":2}}\n' "$head" \
    "$(layer full-0000.qcow2 full)" "$(layer inc-0001.qcow2 incremental)" "$(layer inc-0002.qcow2 incremental)" "$sha" \
    >"$out/manifest/pending-merge.json"
printf '{%s,"layers":[%s,%s,%s]}\n' "$head" "$(layer full-0000.qcow2 full)" "$(layer inc-0001.qcow2 incremental)" \
    "$(layer full-0002.qcow2 full)" >"$out/manifest/two-segments.json"

# Repositories: made by qbackup from a small disk, with 4 KiB layer clusters.
qbackup="${QBACKUP:-}"
if [ -z "$qbackup" ]; then
    (cd "$(dirname "$0")/.." && swift build --product qbackup >&2)
    qbackup="$(cd "$(dirname "$0")/.." && swift build --show-bin-path)/qbackup"
fi
pack() { # REPOSITORY OUTFILE
    python3 - "$1" "$2" <<'PY'
import os, struct, sys
src, dst = sys.argv[1], sys.argv[2]
with open(dst, "wb") as out:
    for name in sorted(os.listdir(src)):
        if name.startswith("."):
            continue
        data = open(os.path.join(src, name), "rb").read()
        out.write(struct.pack(">H", len(name)) + name.encode() + struct.pack(">I", len(data)) + data)
PY
}
repo() { # NAME BACKUP-OPTIONS... (a full backup and two incrementals; the disk changes in between)
    local name="$1"
    shift
    local disk="$work/$name-disk.qcow2" r="$work/$name-repo"
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$disk" 128k
    qemu-io -f qcow2 -c "write -P 0x11 0 12k" -c "write -P 0x12 64k 3k" "$disk" >/dev/null
    "$qbackup" backup "$disk" --repo "$r" --cluster-size 4K "$@" >/dev/null
    qemu-io -f qcow2 -c "write -P 0x21 4k 2k" -c "write -z 64k 4k" "$disk" >/dev/null
    "$qbackup" backup "$disk" --repo "$r" "$@" >/dev/null
    qemu-io -f qcow2 -c "write -P 0x31 100k 1k" -c "discard 0 4k" "$disk" >/dev/null
    "$qbackup" backup "$disk" --repo "$r" "$@" >/dev/null
}
repo three-layers
pack "$work/three-layers-repo" "$out/repository/three-layers"
repo zstd --compress zstd
pack "$work/zstd-repo" "$out/repository/zstd"
repo merged
"$qbackup" merge "$work/merged-repo" --keep 2 >/dev/null
pack "$work/merged-repo" "$out/repository/merged"
repo two-segments
qemu-io -f qcow2 -c "write -P 0x41 8k 4k" "$work/two-segments-disk.qcow2" >/dev/null
"$qbackup" backup "$work/two-segments-disk.qcow2" --repo "$work/two-segments-repo" --full >/dev/null
pack "$work/two-segments-repo" "$out/repository/two-segments"
# Version 2 manifests as qbackup writes them (the version 1 ones above are still read).
for r in three-layers zstd merged two-segments; do cp "$work/$r-repo/manifest.json" "$out/manifest/v2-$r.json"; done
# Replication streams of them: the whole repository, lz4 and plain, and one point after the first.
for r in three-layers zstd merged two-segments; do
    "$qbackup" send "$work/$r-repo" > "$out/stream/$r"
    "$qbackup" send "$work/$r-repo" --compress none > "$out/stream/$r-plain"
done
first="$("$qbackup" list "$work/three-layers-repo" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["index"])')"
"$qbackup" send "$work/three-layers-repo" --after "$first" > "$out/stream/three-layers-after-first"
# A whole stream followed by what a merge at the source then sends its replica (a fold record):
# the target receives the streams of one input one after another.
repo folded
"$qbackup" send "$work/folded-repo" > "$work/folded-first"
"$qbackup" receive "$work/folded-replica" < "$work/folded-first" >/dev/null
"$qbackup" merge "$work/folded-repo" --keep 2 >/dev/null
"$qbackup" list "$work/folded-replica" --output json > "$work/folded-have.json"
"$qbackup" send "$work/folded-repo" --have "$work/folded-have.json" > "$work/folded-next"
cat "$work/folded-first" "$work/folded-next" > "$out/stream/three-layers-then-fold"
for f in "$out/repository"/* "$out/stream"/*; do
    size=$(stat -c %s "$f")
    if [ "$size" -gt $((512 * 1024)) ]; then echo "fuzz-corpus: $f is $size bytes, too big for a seed" >&2; exit 1; fi
done
echo "fuzz-corpus: $(ls "$out/image" | wc -l) images, $(ls "$out/bitmaps" | wc -l) with bitmaps, $(ls "$out/manifest" | wc -l) manifests, $(ls "$out/repository" | wc -l) repositories, $(ls "$out/stream" | wc -l) streams in $out"
