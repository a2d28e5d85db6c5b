#!/bin/sh
# PID 1 of the test guest, stage 1 (runs from the read-only host root: hostfs under UML, 9p under QEMU).
#
# Why a shell script: it only mounts things, before any Python can run from a writable root. It builds
#   tmpfs upper + read-only host "/" lower  ->  overlay root
# so the guest sees the project's venv and every host tool at the same paths, can write anywhere (into RAM), and
# cannot change the host. Then it chroots into the overlay and hands over to guest_inner.py (stage 2).
#
# Inputs (kernel command line KEY=VALUE words become our environment):
#   TESSERA_SHARED   host directory mounted read-write at the same path (spec.json in, results out)
#   TESSERA_KIND     uml | qemu
#   TESSERA_LOWER    where stage 0 mounted the host root (QEMU initramfs); "/" under UML
#   TESSERA_EXPOSE   colon-separated host directories under /tmp, /var/tmp, /run or /dev/shm to show in the guest
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
LOWER="${TESSERA_LOWER:-/}"
fail() {
    echo "tessera-guest: init failed: $*"
    sync
    exec /bin/busybox poweroff -f
}
mount -t proc proc /proc || fail "mount /proc"  # what hostfs shows there is the *host* /proc
mount -t tmpfs -o mode=0755 tessera-ovl /mnt || fail "tmpfs on /mnt"
if [ "${TESSERA_KIND:-uml}" = uml ]; then
    MODDIR=/usr/lib/uml/modules
else
    MODDIR=/lib/modules
fi
if ! grep -q overlay /proc/filesystems; then
    insmod "$(find "$MODDIR/$(uname -r)/kernel/fs/overlayfs" -name 'overlay.ko*' | head -n 1)" || fail "load overlay"
fi
mkdir -p /mnt/upper /mnt/work /mnt/root || fail "mkdir"
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=/mnt/upper,workdir=/mnt/work" /mnt/root || fail "overlay"
R=/mnt/root
mount -t proc proc $R/proc || fail "proc"
mount -t sysfs sysfs $R/sys || fail "sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "run"
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "tmp"
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp || fail "var/tmp"
# Host directories the command needs (the repository and its venv) that lie under a path just covered by the
# guest's own tmpfs: shown again as an overlay of the host's copy (writes go to RAM). See guest.py exposed_dirs.
N=0
for p in $(echo "${TESSERA_EXPOSE:-}" | tr ':' ' '); do
    N=$((N + 1))
    mkdir -p "/mnt/expose$N/upper" "/mnt/expose$N/work" "$R$p" || fail "mkdir $p"
    mount -t overlay overlay -o "lowerdir=$LOWER$p,upperdir=/mnt/expose$N/upper,workdir=/mnt/expose$N/work" "$R$p" \
        || fail "overlay $p"
done
if [ "$MODDIR" != /lib/modules ]; then
    mount --bind "$MODDIR" $R/lib/modules || fail "bind modules"
fi
if [ -n "${TESSERA_SHARED:-}" ]; then
    mkdir -p "$R$TESSERA_SHARED"  # may lie under the guest's fresh /tmp
    if [ "${TESSERA_KIND:-uml}" = uml ]; then
        mount -t hostfs -o "$TESSERA_SHARED" hostfs "$R$TESSERA_SHARED" || fail "hostfs $TESSERA_SHARED"
    else
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none tessera-shared "$R$TESSERA_SHARED" \
            || fail "9p $TESSERA_SHARED"
    fi
fi
exec chroot $R /usr/bin/python3 -I "$(dirname "$0")/guest_inner.py" "$TESSERA_SHARED/spec.json"
fail "exec stage 2"
