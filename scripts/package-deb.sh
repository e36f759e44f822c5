#!/usr/bin/env bash
# Builds a Debian package of qbackup with dpkg-deb and prints its path:
#   scripts/package-deb.sh [--binary PATH] [OUTDIR]
# It holds the stripped release binary (scripts/build-release.sh, unless --binary
# names one already built), the man page generated from the argument parser
# (scripts/man-page.sh: swift-argument-parser's generate-manual plugin), bash/zsh/fish completions
# (qbackup --generate-completion-script), contrib/qbackup-offline-nightly, the
# systemd units qbackup@.service and qbackup@.timer, and README.md. Depends names
# the packages of the shared libraries the binary links (objdump's NEEDED entries,
# found with ldconfig and dpkg -S); libnbd0 and libvirt0, which the live modes dlopen
# (--nbd/--qmp, --libvirt), are Recommended.
# SOURCE_DATE_EPOCH fixes the build date (and so --version's) for a reproducible package.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
if [ "${1:-}" = "--binary" ]; then binary="${2:?--binary needs a path}"; shift 2; fi
out="${1:-.build/deb}"
[ -n "$binary" ] || binary="$(bash scripts/build-release.sh)"
version="$(grep -o 'static let version = "[^"]*"' Sources/qbackup/QBackup.swift | head -n 1 | cut -d'"' -f2)"
[ -n "$version" ] || { echo "package-deb: cannot read the version from Sources/qbackup/QBackup.swift" >&2; exit 1; }
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d /tmp/qbackup-deb.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
root="$stage/qbackup_${version}_${arch}"

install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/man/man1" "$root/usr/share/doc/qbackup" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/lib/systemd/system"
install -m 755 "$binary" "$root/usr/bin/qbackup"
strip --strip-unneeded "$root/usr/bin/qbackup"
install -m 755 contrib/qbackup-offline-nightly "$root/usr/bin/qbackup-offline-nightly"
install -m 644 contrib/systemd/qbackup@.service contrib/systemd/qbackup@.timer "$root/lib/systemd/system/"
install -m 644 README.md "$root/usr/share/doc/qbackup/README.md"

# Man page: generated from the argument parser (scripts/man-page.sh).
manual="$(bash scripts/man-page.sh)"
gzip -9n < "$manual" > "$root/usr/share/man/man1/qbackup.1.gz"

"$root/usr/bin/qbackup" --generate-completion-script bash > "$root/usr/share/bash-completion/completions/qbackup"
"$root/usr/bin/qbackup" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_qbackup"
"$root/usr/bin/qbackup" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/qbackup.fish"

# Depends: the package of each shared library the binary links.
depends=()
for soname in $(objdump -p "$root/usr/bin/qbackup" | awk '$1 == "NEEDED" { print $2 }'); do
    path="$(ldconfig -p | awk -v so="$soname" '$1 == so && /x86-64|'"$arch"'/ { print $NF; exit }' || true)"
    [ -n "$path" ] || path="$(ldconfig -p | awk -v so="$soname" '$1 == so { print $NF; exit }' || true)"
    [ -n "$path" ] || { echo "package-deb: no library file for $soname" >&2; exit 1; }
    pkg="$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -n 1 | cut -d: -f1 || true)"
    [ -n "$pkg" ] || pkg="$(dpkg -S "$path" | head -n 1 | cut -d: -f1 || true)"
    depends+=("$pkg")
done
depends_line="$(printf '%s\n' "${depends[@]}" | sort -u | paste -sd, - | sed 's/,/, /g')"

installed_size="$(du -sk "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<CONTROL
Package: qbackup
Version: $version
Architecture: $arch
Maintainer: qbackup maintainers <qbackup@localhost>
Installed-Size: $installed_size
Depends: $depends_line
Recommends: libnbd0, libvirt0, libvirt-clients, qemu-utils
Section: admin
Priority: optional
Description: incremental backups of QEMU/KVM qcow2 disks with persistent dirty bitmaps
 qbackup keeps a persistent dirty bitmap inside a qcow2 disk image, copies only
 what changed into a new qcow2 layer of a backup repository, restores any point
 in time, folds old points for retention (by count or calendar) and verifies the
 chain and the bitmap. Includes an offline nightly script for libvirt VMs and
 systemd units (qbackup@.service, qbackup@.timer).
CONTROL
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$root" "$out" >&2
echo "$(cd "$out" && pwd)/qbackup_${version}_${arch}.deb"
