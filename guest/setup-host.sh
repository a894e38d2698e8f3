#!/usr/bin/env bash
# Installs what hvprobe needs on a fresh Debian 12 (bookworm) machine: QEMU 10 from
# bookworm-backports (binary and source) for the emulated KVM runners, x86_64 and arm64 (7.2
# lacks hardware breakpoints under TCG), dpkg's arm64 architecture for the arm64 guest's
# packages (kernel, busybox-static:arm64),
# gcc and static libc for the guest's workload programs, the tools that fetch Debian
# packages, and the aarch64 cross toolchain (Debian's gcc-aarch64-linux-gnu as linker and C
# compiler, rustup's aarch64 standard library, qemu-user to run the aarch64 unit tests),
# e2fsprogs (mke2fs packs --share directories and root file systems; the disk tests read
# images with debugfs), and debootstrap (the Debian root file system of --rootfs).
# Idempotent; safe to run before every build.
set -euo pipefail

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}

here=$(cd "$(dirname "$0")" && pwd)
# bookworm-backports for binary and source packages, decided per type (guest/apt-backports.sh).
bash "$here/apt-backports.sh"

# The arm64 guest's packages come from the same mirror as a foreign architecture.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
fi

echo "setup-host: apt-get update and install (gcc, dpkg-dev, QEMU ${codename}-backports; about a minute the first time)" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev dpkg-dev ca-certificates \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user e2fsprogs debootstrap >/dev/null
if command -v rustup >/dev/null; then
    rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 ||
        echo "setup-host: rustup could not add aarch64-unknown-linux-gnu; the aarch64 build will fail" >&2
fi
$SUDO apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 qemu-system-arm >/dev/null
qemu-system-x86_64 --version | head -n1
qemu-system-aarch64 --version | head -n1
