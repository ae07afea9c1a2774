#!/bin/busybox sh
# vNode initramfs /init (installed by guest-images/scripts/linux.sh).
# Loads the kernel's own virtio modules, mounts the root disk (default /dev/vda, ext4) and
# switch_roots into its /sbin/init. Without a root disk: a clear message, then a shell, or, when
# a job was asked for (vnode.job=..., not "shell"), a JSON record of the failure and power-off.
#
# Kernel command line: root=/dev/vdX  rootfstype=ext4  rootflags=...  ro|rw (default rw)
#                      vnode.rootwait=SECONDS (default 10)  vnode.job=NAME  vnode.exit=poweroff|reboot
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot /tmp
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VNODE-INITRAMFS-UP uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"

root=/dev/vda fstype=ext4 flags= mode=rw rootwait=10 job= exitmode=poweroff
for w in $(cat /proc/cmdline); do
    case "$w" in
        root=*) root=${w#root=} ;;
        rootfstype=*) fstype=${w#rootfstype=} ;;
        rootflags=*) flags=${w#rootflags=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        vnode.rootwait=*) rootwait=${w#vnode.rootwait=} ;;
        vnode.job=*) job=${w#vnode.job=} ;;
        vnode.exit=*) exitmode=${w#vnode.exit=} ;;
    esac
done

loaded= failed=
for m in $(cat /etc/vnode-modules); do
    if insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
        loaded="$loaded $m"
    elif ! grep -q 'File exists' /tmp/insmod.err; then
        failed="$failed $m"; echo "vnode-initramfs: insmod $m failed: $(cat /tmp/insmod.err)"
    fi
done
echo "vnode-initramfs: modules loaded:${loaded:- none}${failed:+; FAILED:$failed}"

# root=LABEL=x / UUID=x: resolve with blkid (busybox findfs).
want=$root
i=0
while :; do
    case "$want" in LABEL=*|UUID=*) root=$(findfs "$want" 2>/dev/null || echo "$want") ;; esac
    [ -b "$root" ] && break
    [ $i -ge $((rootwait * 10)) ] && break
    i=$((i + 1)); usleep 100000
done

fail() {
    echo "vnode-initramfs: ERROR: $*"
    echo "vnode-initramfs: block devices: $(ls /sys/block 2>/dev/null | tr '\n' ' ')"
    echo "vnode-initramfs: virtio devices: $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
    if [ -n "$job" ] && [ "$job" != shell ]; then
        echo "VNODE-JSON-BEGIN"
        printf '{"job":"%s","stage":"initramfs","error":"%s","uptime_s":%s,"kernel":"%s","cpus":%s}\n' \
            "$job" "$*" "$(cut -d' ' -f1 /proc/uptime)" "$(uname -r)" "$(grep -c ^processor /proc/cpuinfo)"
        echo "VNODE-JSON-END"
        echo "VNODE-EXIT rc=1"
        sync
        if [ "$exitmode" = reboot ]; then reboot -f; else poweroff -f; fi
        echo o > /proc/sysrq-trigger; sleep 5; reboot -f
    fi
    echo "vnode-initramfs: dropping to a shell (busybox); 'exit' powers off"
    setsid cttyhack sh
    poweroff -f
}

[ -b "$root" ] || fail "no root disk $want after ${rootwait}s (expected a virtio-blk disk with an ext4 root filesystem)"
mount -t "$fstype" -o "$mode${flags:+,$flags}" "$root" /newroot || fail "cannot mount $root ($fstype, $mode${flags:+,$flags})"
[ -x /newroot/sbin/init ] || fail "$root has no /sbin/init"
echo "vnode-initramfs: root $root mounted ($fstype,$mode), switching to its /sbin/init at $(cut -d' ' -f1 /proc/uptime)s"
for d in dev proc sys; do mkdir -p /newroot/$d; mount --move /$d /newroot/$d; done
exec switch_root /newroot /sbin/init
