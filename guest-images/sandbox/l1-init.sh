#!/bin/busybox sh
# /init of the sandbox's L1 initramfs (see run.sh). Runs in the L1 guest (QEMU TCG, AMD CPU with
# SVM + NPT): loads virtio-pci, 9p and kvm-amd, mounts the host root read-only at /host and the
# writable shares at their own paths inside it, runs the caller's command chrooted in /host and
# writes its exit status back to the run directory, then powers off.
#
# Kernel command line: vnode.run=RUNDIR (a host directory, shared writable as tag "run")
#   RUNDIR/shares: "TAG PATH" lines for the other writable shares
#   RUNDIR/cmd.sh: the command (bash); RUNDIR/stdout, RUNDIR/stderr, RUNDIR/rc: its results
#   RUNDIR/l1.log: this script's own messages
B=/bin/busybox
$B mkdir -p /proc /sys /dev /host /tmp
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
$B --install -s /bin
export PATH=/bin:/sbin

say() { echo "sandbox-l1: $*"; }
run=
for w in $(cat /proc/cmdline); do
    case "$w" in vnode.run=*) run=${w#vnode.run=} ;; esac
done

die() {
    say "ERROR: $*"
    [ -n "$run" ] && [ -d "/host$run" ] && echo "sandbox-l1: ERROR: $*" >> "/host$run/l1.log" 2>/dev/null
    sync; poweroff -f; echo o > /proc/sysrq-trigger
    sleep 10
}

for m in $(cat /etc/sandbox-modules); do
    insmod "/lib/modules/$m.ko" 2>/tmp/err || grep -q 'File exists' /tmp/err || say "insmod $m: $(cat /tmp/err)"
done
[ -c /dev/kvm ] || say "WARNING: no /dev/kvm in L1 (kvm-amd did not load: $(dmesg | grep -i -E 'kvm|svm' | tail -n 3 | tr '\n' ' '))"

# Host root, read-only. cache=loose: binaries and libraries read once over 9p, then from L1's page cache.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
    || die "cannot mount the host root over 9p"
mount --bind /dev /host/dev
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm 2>/dev/null
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t tmpfs -o mode=0755 tmpfs /host/run
mkdir -p /host/run/tmp && chmod 1777 /host/run/tmp
[ -n "$run" ] || die "no vnode.run= on the kernel command line"
# Writable shares, uncached so the host sees results at once. /run/... shares go on the tmpfs.
mkdir -p "/host$run" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 run "/host$run" || die "cannot mount the run directory $run"
if [ -f "/host$run/shares" ]; then
    while read -r tag path; do
        [ -n "$tag" ] || continue
        mkdir -p "/host$path" 2>/dev/null
        mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 "$tag" "/host$path" \
            || say "WARNING: cannot mount share $path" >> "/host$run/l1.log"
    done < "/host$run/shares"
fi
ip link set lo up 2>/dev/null
up=$(cut -d' ' -f1 /proc/uptime)
echo "l1_up_s=$up kvm=$([ -c /dev/kvm ] && echo yes || echo no) cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/^MemTotal/{print $2}' /proc/meminfo)" > "/host$run/l1.up"
say "up at ${up}s, running the command"

chroot /host /bin/bash "$run/cmd.sh" > "/host$run/stdout" 2> "/host$run/stderr" < /dev/null
echo $? > "/host$run/rc"
sync
poweroff -f
echo o > /proc/sysrq-trigger
sleep 10
