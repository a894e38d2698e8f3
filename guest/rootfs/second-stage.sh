# Run by the default guest's /init with the new root file system's image mounted on
# /mnt/root: debootstrap's second stage (every package's configuration, natively in the
# guest), then what makes it hvprobe's guest. Any failure ends with a non-zero status.
set -e
r=/mnt/root
mount -o bind /dev "$r/dev"
chroot "$r" /debootstrap/debootstrap --second-stage
chroot "$r" passwd -d root >/dev/null
chroot "$r" apt-get clean
umount "$r/dev"
sync
echo "hvprobe-rootfs: second stage done"
