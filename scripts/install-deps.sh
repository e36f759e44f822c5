#!/usr/bin/env bash
# Installs what qbackup needs to build and test on Debian: the C libraries it
# links (zlib, zstd, lz4), libnbd's header (live backups dlopen libnbd.so.0 from
# libnbd0, which libnbd-dev pulls in) and QEMU's tools and emulator, the
# reference peers of the tests (the live tests run qemu-system-x86_64);
# libvirtd and virsh for the offline nightly script's and backup --libvirt's tests (their
# fixture starts libvirtd itself, no systemd needed), libvirt's headers (backup --libvirt
# dlopens libvirt.so.0 from libvirt0, which libvirt-dev pulls in), systemd-analyze for the
# units' check, certtool (gnutls-bin) for the certificates of the nbds:// (TLS) test, binutils
# (objdump, strip) for scripts/package-deb.sh, man-db for the man page's test, and
# openssh-server, openssh-client and rsync for replication over ssh (the tests start their
# own sshd on 127.0.0.1, Tests/TestSupport/SSHServer.swift; the benchmark compares with rsync).
set -euo pipefail
packages=(pkg-config git zlib1g-dev libzstd-dev liblz4-dev qemu-utils libnbd-bin libnbd-dev qemu-system-x86
          libvirt-daemon-system libvirt-clients libvirt-dev systemd gnutls-bin binutils man-db
          openssh-server openssh-client rsync)
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
