#!/bin/bash
# PID 1 of the test VM, in the host's root under a tmpfs overlay (see scripts/vm/init): set up what
# a Debian 12 machine has at boot and CRIU needs (proc, sys, devpts, cgroup2, a tmpfs /run,
# the kernel's own modules, loopback up, fs.pipe-max-size), run the job the host wrote into the
# results share (9p tag "results", mounted on /run/pycriu-vm), bring back its output, exit status and
# CRIU's logs there, and power off. Nothing is installed: the guest runs the host's own files.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
out=/run/pycriu-vm
off() { sync; echo o >/proc/sysrq-trigger; sleep 30; }
say() { echo "pycriu-vm: $*"; }

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=0755 run /run
mkdir -p /run/lock # as a booted Debian has it (the benchmark takes its lock there)
# /tmp stays the overlay's (in RAM already): a tmpfs on it would hide a checkout under /tmp (CI's
# clone may be there). The logs brought back are only those this run wrote (newer than the mark).
touch /run/pycriu-vm-start
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
mount --bind /dev/pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p "$out"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "$out"; then
	say "cannot mount the results share (9p tag results)"
	off
fi
hostname pycriu-vm
# shellcheck source=/dev/null
. "$out/job.env" # MODULES (the unpacked kernel's lib/modules), JOB_TIMEOUT (seconds)

# The kernel's modules: the unpacked package's tree in place of the host's.
mkdir -p /usr/lib/modules && mount --bind "$MODULES" /usr/lib/modules
# CRIU's socket dumps need the sock_diag modules; the tests use veth, tun, nf_tables, netem.
for m in inet_diag tcp_diag udp_diag unix_diag netlink_diag raw_diag af_packet_diag \
	nf_tables nft_reject_inet tun veth sch_netem; do
	modprobe "$m" 2>/dev/null || say "modprobe $m failed"
done
ip link set lo up
echo 4194304 >/proc/sys/fs/pipe-max-size # as scripts/provision.sh does on the host

# The temporary directory on ext4, as a Debian machine's is: the overlay root cannot open file
# handles (no nfs_export), so CRIU could not dump an inotify watch of a file there ("fsnotify:
# Can't dump that handle"). A sparse file in RAM (/run), its blocks given back as files go
# (discard); on /var/tmp, with TMPDIR, for /tmp itself may hold a checkout (CI's clone).
if modprobe loop && modprobe ext4 && truncate -s 64G /run/tmp.ext4 && mkfs.ext4 -q -F /run/tmp.ext4 &&
	mount -o loop,discard /run/tmp.ext4 /var/tmp; then
	chmod 1777 /var/tmp
	export TMPDIR=/var/tmp
else
	say "no ext4 temporary directory: TMPDIR stays on the overlay (inotify dumps of its files fail)"
fi

say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) MiB; running the job"
start=$(date +%s)
# The job in its own PID namespace and session, as CI runs the suite on the host.
timeout --kill-after=10 "$JOB_TIMEOUT" unshare --pid --fork --mount-proc setsid bash "$out/job.sh" 2>&1 |
	tee "$out/output.log"
rc=${PIPESTATUS[0]}
say "job ended with status $rc after $(($(date +%s) - start)) s"
[ "$rc" = 124 ] && say "the job timed out after $JOB_TIMEOUT s"

# CRIU's logs (and pycriu's kept ones) from every temporary directory of the run.
(cd / && find tmp var/tmp -name '*.log' -size -20M -newer run/pycriu-vm-start -print0 2>/dev/null |
	tar --null -czf "$out/logs.tar.gz" -T - 2>/dev/null) || say "could not collect the logs"
echo "$rc" >"$out/rc"
off
