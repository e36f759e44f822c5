#!/usr/bin/env bash
# Builds and runs one libFuzzer target for SECONDS:
#   scripts/fuzz.sh TARGET SECONDS [extra libFuzzer flags...]
# TARGET is one of: image, bitmaps, write, manifest, repository, repair, stream (see Tests/FuzzTargets). Builds Fuzz/ with
# -sanitize=fuzzer,address into .build-fuzz, generates the seed corpus
# (scripts/fuzz-corpus.sh) if missing, and fuzzes with nice -n 19. Exits
# non-zero on any crash, sanitizer report, leak, timeout (10 s per input) or
# out-of-memory (2 GiB); the reproducer is written to fuzz-out/TARGET/.
# A crash input belongs in Fuzz/regressions/TARGET/ once fixed (minimise it with
#   .build-fuzz/release/FuzzImage -minimize_crash=1 -runs=10000 CRASHFILE).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: fuzz.sh TARGET SECONDS}"
seconds="${2:?usage: fuzz.sh TARGET SECONDS}"
shift 2
case "$target" in
    image) product=FuzzImage ;;
    bitmaps) product=FuzzBitmaps ;;
    write) product=FuzzWrite ;;
    manifest) product=FuzzManifest ;;
    repository) product=FuzzRepository ;;
    repair) product=FuzzRepair ;;
    stream) product=FuzzStream ;;
    *) echo "fuzz.sh: unknown target '$target' (image, bitmaps, write, manifest, repository, repair, stream)" >&2; exit 2 ;;
esac
scratch="$PWD/.build-fuzz"
# SwiftPM does not notice files added to a path dependency (the main package) once
# it has planned a build; dropping the plan makes it scan the sources again.
rm -f "$scratch/release.yaml" "$scratch/release/description.json"
(cd Fuzz && nice -n 19 swift build -c release --scratch-path "$scratch" --product "$product" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xswiftc -g) >&2
bin="$scratch/release/$product"
seeds="$scratch/seeds"
# The repair target starts from the image seeds (damaged ones come from mutation).
seedset="$target"
[ "$target" = repair ] && seedset=image
[ -d "$seeds/$seedset" ] || bash scripts/fuzz-corpus.sh "$seeds" >&2
corpus="$scratch/corpus/$target"
artifacts="$PWD/fuzz-out/$target"
mkdir -p "$corpus" "$artifacts"
dict=()
[ -f "Fuzz/dicts/$target.dict" ] && dict=(-dict="Fuzz/dicts/$target.dict")
# New inputs go to the first folder (the working corpus); seeds and regressions are read only.
export SWIFT_BACKTRACE=enable=no  # let ASan and libFuzzer report crashes
exec nice -n 19 "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -max_len=1048576 -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" "$@" \
    "$corpus" "$seeds/$seedset" "Fuzz/regressions/$target"
