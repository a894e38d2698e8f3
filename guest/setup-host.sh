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

# The mirror this machine already uses for Debian itself.
debian_mirror() {
	local uri
	uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources | head -n1 | awk '{print $2}')
	[ -n "$uri" ] || uri=$(grep -hs "^deb .* ${codename} " /etc/apt/sources.list | head -n1 | awk '{print $2}')
	[ -n "$uri" ] || { echo "setup-host: cannot find this machine's Debian mirror" >&2; exit 1; }
	echo "$uri"
}

# Adds `TYPE` lines for bookworm-backports unless the machine has them.
add_backports() {
	local type=$1 file=$2
	if ! grep -rqsE -- "^(${type} .*${codename}-backports|Types: ${type}$)" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		$SUDO tee "/etc/apt/sources.list.d/${file}" >/dev/null <<SRC
Types: ${type}
URIs: $(debian_mirror)
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
	fi
}

add_backports deb hvprobe-backports.sources
# Source packages too: the emulated runner builds Debian's own QEMU source with a patch
# (guest/qemu/build.sh).
add_backports deb-src hvprobe-backports-src.sources

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev dpkg-dev ca-certificates >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -n1
