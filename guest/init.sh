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
# the kernel gave it, and mounted before the command runs.
mounts=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	hvprobe.mounts=*) mounts=$(echo "${arg#hvprobe.mounts=}" | base64 -d) ;;
	esac
done
if [ -n "$mounts" ]; then
	for m in virtio_ring virtio virtio_mmio virtio_blk; do
		insmod /lib/modules/$m.ko 2>/dev/null
	done
	echo "$mounts" | while read -r index mode path; do
		[ -n "$index" ] || continue
		dev=
		i=0
		while [ -z "$dev" ] && [ $i -lt 50 ]; do
			for s in /sys/block/vd*/serial; do
				case "$(cat "$s" 2>/dev/null)" in
				"hv$index-"*) dev=${s%/serial} dev=/dev/${dev##*/} ;;
				esac
			done
			[ -n "$dev" ] || sleep 0.1
			i=$((i + 1))
		done
		if [ -z "$dev" ]; then
			echo "hvprobe-init: disk $index: not found (no virtio-blk disk with serial hv$index-)"
		elif ! mkdir -p "$path" 2>/tmp/mount.err || ! mount -o "$mode" "$dev" "$path" 2>/tmp/mount.err; then
			echo "hvprobe-init: disk $index ($dev): not mounted on $path: $(cat /tmp/mount.err)"
		fi
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
