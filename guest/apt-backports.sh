#!/usr/bin/env bash
# Makes sure apt knows ${codename}-backports, for binary packages (`deb`) and for source
# packages (`deb-src`), from the Debian mirror this machine already uses. Decides per type:
# backports counts as configured for a type only when an enabled deb822 stanza (a `.sources`
# file) or a one-line entry (`sources.list`, a `.list` file) of that type lists the suite.
# Files apt does not read (other extensions, such as `*.disabled`) do not count. Existing files
# are never touched; what is missing goes into hvprobe-backports{,-src}.sources. Idempotent.
#
# Usage: guest/apt-backports.sh           configure (what setup-host.sh calls)
#        guest/apt-backports.sh --check   print "deb yes|no" and "deb-src yes|no", change nothing
# HVPROBE_APT_ETC points it at another directory than /etc/apt (the tests use fixtures);
# HVPROBE_CODENAME overrides the release codename from /etc/os-release.
set -euo pipefail

apt_etc=${HVPROBE_APT_ETC:-/etc/apt}
if [ -n "${HVPROBE_CODENAME:-}" ]; then
	codename=$HVPROBE_CODENAME
else
	. /etc/os-release
	codename=${VERSION_CODENAME:-bookworm}
fi
suite="${codename}-backports"

# The files apt reads, each with its format: "deb822 PATH" or "oneline PATH".
source_files() {
	[ -f "$apt_etc/sources.list" ] && echo "oneline $apt_etc/sources.list"
	local f
	for f in "$apt_etc"/sources.list.d/*.list; do
		[ -f "$f" ] && echo "oneline $f"
	done
	for f in "$apt_etc"/sources.list.d/*.sources; do
		[ -f "$f" ] && echo "deb822 $f"
	done
	return 0
}

# Succeeds when the deb822 FILE has an enabled stanza of TYPE listing SUITE. Comment lines do
# not end a stanza; a field may continue on indented lines.
deb822_lists() {
	awk -v want_type="$2" -v want_suite="$3" '
		function has(list, word,   n, a, i) {
			n = split(list, a, /[ \t]+/)
			for (i = 1; i <= n; i++) if (a[i] == word) return 1
			return 0
		}
		function flush() {
			if (enabled && has(types, want_type) && has(suites, want_suite)) found = 1
			types = ""; suites = ""; enabled = 1; field = ""
		}
		BEGIN { enabled = 1 }
		/^#/ { next }
		/^[ \t]*$/ { flush(); next }
		/^[ \t]/ {
			if (field == "types") types = types " " $0
			else if (field == "suites") suites = suites " " $0
			next
		}
		{
			colon = index($0, ":")
			if (colon == 0) next
			field = tolower(substr($0, 1, colon - 1))
			value = substr($0, colon + 1)
			if (field == "types") types = value
			else if (field == "suites") suites = value
			else if (field == "enabled") { v = tolower(value); gsub(/[ \t]/, "", v); enabled = (v != "no") }
		}
		END { flush(); exit found ? 0 : 1 }
	' "$1"
}

# Succeeds when the one-line-format FILE has an entry `TYPE [options] URI SUITE ...`.
oneline_lists() {
	awk -v want_type="$2" -v want_suite="$3" '
		{ sub(/#.*/, "") }
		$1 != want_type { next }
		{
			line = $0
			sub(/^[ \t]*[^ \t]+[ \t]+/, "", line)
			if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
			split(line, f, /[ \t]+/)
			if (f[2] == want_suite) found = 1
		}
		END { exit found ? 0 : 1 }
	' "$1"
}

# Succeeds when apt already has TYPE entries for the backports suite.
backports_configured() {
	local type=$1 format file
	while read -r format file; do
		if "${format}_lists" "$file" "$type" "$suite"; then
			return 0
		fi
	done < <(source_files)
	return 1
}

# The mirror this machine already uses for Debian itself: the first URI of a stanza or entry
# for the release suite.
debian_mirror() {
	local format file uri
	while read -r format file; do
		if [ "$format" = deb822 ]; then
			uri=$(awk -v want_suite="$codename" '
				function flush() {
					n = split(suites, a, /[ \t]+/)
					for (i = 1; i <= n; i++) if (a[i] == want_suite && uri != "") { print uri; exit 0 }
					suites = ""; uri = ""
				}
				/^#/ { next }
				/^[ \t]*$/ { flush(); next }
				tolower($1) == "uris:" { uri = $2 }
				tolower($1) == "suites:" { suites = $0; sub(/^[^:]*:/, "", suites) }
				END { flush() }
			' "$file")
		else
			uri=$(awk -v want_suite="$codename" '
				{ sub(/#.*/, "") }
				$1 == "deb" {
					line = $0
					sub(/^[ \t]*[^ \t]+[ \t]+/, "", line)
					if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
					split(line, f, /[ \t]+/)
					if (f[2] == want_suite) { print f[1]; exit 0 }
				}
			' "$file")
		fi
		if [ -n "$uri" ]; then
			echo "$uri"
			return 0
		fi
	done < <(source_files)
	echo "apt-backports: cannot find this machine's Debian mirror for ${codename} under ${apt_etc}" >&2
	return 1
}

# Writes a deb822 stanza of TYPE for the backports suite into FILE (under sources.list.d).
add_backports() {
	local type=$1 file=$2 mirror dir
	mirror=$(debian_mirror)
	dir="$apt_etc/sources.list.d"
	local sudo=
	if [ ! -w "$dir" ] && [ "$(id -u)" -ne 0 ]; then
		sudo=sudo
	fi
	echo "apt-backports: adding ${type} entries for ${suite} from ${mirror} (${dir}/${file})" >&2
	$sudo tee "${dir}/${file}" >/dev/null <<SRC
Types: ${type}
URIs: ${mirror}
Suites: ${suite}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

if [ "${1:-}" = --check ]; then
	for type in deb deb-src; do
		if backports_configured "$type"; then echo "$type yes"; else echo "$type no"; fi
	done
	exit 0
fi

backports_configured deb || add_backports deb hvprobe-backports.sources
# Source packages too: the emulated runner builds Debian's own QEMU source with a patch
# (guest/qemu/build.sh).
backports_configured deb-src || add_backports deb-src hvprobe-backports-src.sources
