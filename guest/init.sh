#!/bin/sh
# /init of the hvprobe default guest. Runs the command passed base64-encoded as
# hvprobe.exec=... on the kernel command line (or a shell on the console when there is none),
# prints the exit status as a marker line the VMM reads, and resets the machine, which the VMM
# takes as shutdown.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /sys/kernel/tracing
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
hostname hvprobe-guest
# The boot stays quiet (loglevel=3), but from here on warnings reach the console too: the VMM
# reads WARN() and lockup reports there while its probes are in.
echo 5 > /proc/sys/kernel/printk
# Disks from the VMM (hvprobe.mounts: base64 of "INDEX ro|rw GUESTPATH" lines): their
# drivers are modules; each disk is found by its serial number, hv<INDEX>-..., whatever name
# the kernel gave it, and mounted before the command runs. A disk at "/" is a root file
# system (hvprobe run --rootfs): it is mounted on /newroot, the others inside it, and /init
# hands over to its init (systemd) instead of running the command itself.
mounts=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	hvprobe.mounts=*) mounts=$(echo "${arg#hvprobe.mounts=}" | base64 -d) ;;
	esac
done
# disk_node INDEX: the /dev node of the disk with serial hv<INDEX>-..., waiting up to 5 s.
disk_node() {
	i=0
	while [ $i -lt 50 ]; do
		for s in /sys/block/vd*/serial; do
			case "$(cat "$s" 2>/dev/null)" in
			"hv$1-"*) d=${s%/serial} && echo "/dev/${d##*/}" && return 0 ;;
			esac
		done
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}
# mount_disk INDEX MODE DIR
mount_disk() {
	if ! dev=$(disk_node "$1"); then
		echo "hvprobe-init: disk $1: not found (no virtio-blk disk with serial hv$1-)"
		return 1
	elif ! mkdir -p "$3" 2>/tmp/mount.err || ! mount -o "$2" "$dev" "$3" 2>/tmp/mount.err; then
		echo "hvprobe-init: disk $1 ($dev): not mounted on $3: $(cat /tmp/mount.err)"
		return 1
	fi
}
root=
if [ -n "$mounts" ]; then
	for m in virtio_ring virtio virtio_mmio virtio_blk; do
		insmod /lib/modules/$m.ko 2>/dev/null
	done
	prefix=
	rootline=$(echo "$mounts" | while read -r index mode path; do
		[ "$path" = / ] && echo "$index $mode" && break
	done)
	if [ -n "$rootline" ]; then
		if mount_disk ${rootline% *} ${rootline#* } /newroot; then
			root=/newroot prefix=/newroot
		else
			echo "hvprobe-init: no root file system; running the command in the initramfs"
		fi
	fi
	echo "$mounts" | while read -r index mode path; do
		[ -n "$index" ] && [ "$path" != / ] || continue
		mount_disk "$index" "$mode" "$prefix$path"
	done
fi
case " $(cat /proc/cmdline) " in
*" hvprobe.wait=1 "*)
	# The VMM plants its probes when it sees the marker, then sends one line on the console:
	# wait for it so the command's first calls are already probed.
	stty -echo 2>/dev/null
	echo "HVPROBE-INIT-READY"
	read -r -t 120 _ || echo "hvprobe-init: no go-ahead from the VMM, running anyway"
	stty echo 2>/dev/null
	;;
*) echo "HVPROBE-INIT-READY" ;;
esac
if [ -n "$root" ]; then
	# systemd mounts what it needs itself; /dev, /proc and /sys go along so that the
	# console stays open and tracefs stays mounted.
	for m in autofs4 binfmt_misc; do
		insmod /lib/modules/$m.ko 2>/dev/null
	done
	for m in /dev /proc /sys; do
		mount --move $m $root$m
	done
	exec switch_root -c /dev/console $root /sbin/init
fi
cmd=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	hvprobe.exec=*) cmd=$(echo "${arg#hvprobe.exec=}" | base64 -d) ;;
	esac
done
if [ -n "$cmd" ]; then
	sh -c "$cmd"
	status=$?
else
	setsid cttyhack sh
	status=$?
fi
echo "HVPROBE-EXIT-STATUS=$status"
reboot -f
