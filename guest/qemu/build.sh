#!/usr/bin/env bash
# Builds the runner's QEMU: Debian's own qemu source (the version of the installed
# qemu-system-x86, from bookworm-backports) with int3-into-exception-intercept.patch, so
# that a nested guest's int3 reaches its hypervisor as a #BP exit the way it does on AMD
# hardware, and SVM has NRIP save as every AMD CPU does (a nested KVM re-injects int3 through
# NRIP). x86_64-softmmu only, TCG only. The result is cached by QEMU version and patch
# hash; a second call prints the cached binary's path at once.
#
# Usage: guest/qemu/build.sh CACHE_DIR   (prints the path of qemu-system-x86_64)
set -euo pipefail

cache=${1:?usage: build.sh CACHE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
patch="$here/int3-into-exception-intercept.patch"
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

version=$(dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null || true)
[ -n "$version" ] || { echo "qemu build: qemu-system-x86 is not installed (run guest/setup-host.sh)" >&2; exit 1; }
upstream=${version#*:}
upstream=${upstream%%+*}
patch_hash=$(sha256sum "$patch" | cut -c1-12)
out="$cache/qemu/${upstream}-${patch_hash}"
bin="$out/qemu-system-x86_64"
if [ -x "$bin" ]; then
	echo "$bin"
	exit 0
fi

mkdir -p "$cache/qemu"
exec 9>"$cache/qemu/.lock"
flock 9
if [ -x "$bin" ]; then
	echo "$bin"
	exit 0
fi
echo "qemu build: building patched QEMU $upstream (one time, about 5 minutes on 2 cores)" >&2

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
# hvprobe writes this script beside a copy of the check (HVPROBE_APT_BACKPORTS); in the source
# tree the check is guest/apt-backports.sh.
if ! bash "${HVPROBE_APT_BACKPORTS:-$here/../apt-backports.sh}" --check | grep -qx 'deb-src yes'; then
	echo "qemu build: apt has no deb-src entry for ${codename}-backports; run guest/setup-host.sh" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq --no-install-recommends -t "${codename}-backports" meson python3-pycotap >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends ninja-build libglib2.0-dev libslirp-dev \
	flex bison pkg-config python3-venv libpixman-1-dev zlib1g-dev libfdt-dev xz-utils gcc make >/dev/null

work=$(mktemp -d "$cache/qemu/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
# Only the upstream .orig tarball may be on the mirror; it is all the build needs.
apt-get source --download-only -t "${codename}-backports" "qemu=$version" >/dev/null 2>&1 || true
orig=$(ls qemu_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$orig" ] || { echo "qemu build: could not download the source of qemu $version" >&2; exit 1; }
tar xf "$orig"
src=$(find . -maxdepth 1 -type d -name 'qemu-*' | head -n1)
cd "$src"
patch -p1 --quiet < "$patch"
# The Debian +ds tarball drops prebuilt firmware; meson wants the edk2 inputs to exist.
for f in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',.*/\1/p" pc-bios/meson.build); do
	[ -e "pc-bios/$f.bz2" ] || python3 -c 'import bz2,sys; open(sys.argv[1],"wb").write(bz2.compress(b""))' "pc-bios/$f.bz2"
done
./configure --python=/usr/bin/python3 --target-list=x86_64-softmmu --without-default-features \
	--enable-tcg --enable-slirp --enable-fdt=system --disable-install-blobs --disable-docs --disable-werror >"$work/configure.log" 2>&1 ||
	{ tail -n 30 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" qemu-system-x86_64 >"$work/make.log" 2>&1 || { tail -n 40 "$work/make.log" >&2; exit 1; }
mkdir -p "$out.tmp"
cp build/qemu-system-x86_64 "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$bin"
