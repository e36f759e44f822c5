#!/usr/bin/env bash
# Generates qbackup(1) from the argument parser (swift-argument-parser's generate-manual
# plugin, reading a debug build: the same text as release) and prints its path. The
# plugin copies the commands' discussions verbatim: a blank line (a paragraph break)
# becomes mdoc's .Pp, and an indented line (a command example) a .Dl display line,
# so that man neither warns nor fills the examples into the paragraph.
set -euo pipefail
cd "$(dirname "$0")/.."
swift package plugin generate-manual --configuration debug >&2
generated=".build/plugins/GenerateManual/outputs/qbackup/qbackup.1"
[ -s "$generated" ] || { echo "man-page: the generate-manual plugin wrote no $generated" >&2; exit 1; }
out=".build/man/qbackup.1"
mkdir -p "$(dirname "$out")"
sed -e 's/^$/.Pp/' -e 's/^[[:space:]]\{1,\}\(.*\)$/.Dl \1/' "$generated" > "$out"
echo "$(pwd)/$out"
