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
# A disk from the VMM (hvprobe.disk=rw|ro): its drivers are modules; mount it on /mnt.
disk=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	hvprobe.disk=*) disk=${arg#hvprobe.disk=} ;;
	esac
done
if [ -n "$disk" ]; then
	for m in virtio_ring virtio virtio_mmio virtio_blk; do
		insmod /lib/modules/$m.ko 2>/dev/null
	done
	i=0
	while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	if [ ! -b /dev/vda ]; then
		echo "hvprobe-init: no /dev/vda: the disk's driver did not find it"
	elif ! mount -o "$disk" /dev/vda /mnt 2>/tmp/mount.err; then
		echo "hvprobe-init: /dev/vda not mounted on /mnt: $(cat /tmp/mount.err)"
	fi
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
