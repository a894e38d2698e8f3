#!/usr/bin/env bash
# Installs what hvprobe needs on a fresh Debian 12 (bookworm) machine: QEMU 10 from
# bookworm-backports (binary and source) for the emulated KVM runner (7.2 lacks hardware
# breakpoints under TCG),
# gcc and static libc for the guest's workload programs, and the tools that fetch Debian
# packages. Idempotent; safe to run before every build.
set -euo pipefail

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}

here=$(cd "$(dirname "$0")" && pwd)
# bookworm-backports for binary and source packages, decided per type (guest/apt-backports.sh).
bash "$here/apt-backports.sh"

echo "setup-host: apt-get update and install (gcc, dpkg-dev, QEMU ${codename}-backports; about a minute the first time)" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev dpkg-dev ca-certificates >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -n1
