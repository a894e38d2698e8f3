#!/usr/bin/env bash
# Installs what hvprobe needs on a fresh Debian 12 (bookworm) machine: QEMU 10 from
# bookworm-backports for the emulated KVM runner (7.2 lacks hardware breakpoints under TCG),
# gcc and static libc for the guest's workload programs, and the tools that fetch Debian
# packages. Idempotent; safe to run before every build.
set -euo pipefail

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}

has_backports() {
	grep -rqs -- "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

if ! has_backports; then
	# Use the mirror this machine already uses for Debian itself.
	uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources | head -n1 | awk '{print $2}')
	if [ -z "$uri" ]; then
		uri=$(grep -hs "^deb .* ${codename} " /etc/apt/sources.list | head -n1 | awk '{print $2}')
	fi
	[ -n "$uri" ] || { echo "setup-host: cannot find this machine's Debian mirror" >&2; exit 1; }
	$SUDO tee /etc/apt/sources.list.d/hvprobe-backports.sources >/dev/null <<SRC
Types: deb
URIs: ${uri}
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev dpkg-dev ca-certificates >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -n1
