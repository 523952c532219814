#!/usr/bin/env bash
# Run a command of this checkout inside the test VM: Debian 12's own kernel (6.1, with soft-dirty
# memory tracking) under QEMU, over the host's root (see docs/testvm.rst).
#
#   scripts/vm/run.sh .venv/bin/python -m pytest tests/test_migration_precopy.py
#
# Builds what it needs first (scripts/vm/build.sh, cached), boots the guest, runs the command in
# the checkout there and brings back into $PYCRIU_VM_RESULTS: output.log (the command's output),
# rc (its exit status), logs.tar.gz (CRIU's logs from the guest's temporary directories) and
# console.log (the guest's serial console). Exits with the command's status; fails loudly, with the
# console, when the guest does not come up or the command does not finish in time.
#
# Environment: PYCRIU_VM_TIMEOUT (seconds for the command, 1800), PYCRIU_VM_BOOT_TIMEOUT (seconds
# until the guest runs the command, 180), PYCRIU_VM_MEM (MiB, 2048), PYCRIU_VM_CPUS (2),
# PYCRIU_VM_ACCEL (tcg; kvm only where it is known to work), PYCRIU_VM_RESULTS (build/vm in the
# checkout), PYCRIU_VM_QUIET (1: no live console, only the command's output
# at the end); the console's end is printed on failure, and build.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checkout=$(cd "$here/../.." && pwd)
timeout_s=${PYCRIU_VM_TIMEOUT:-1800}
boot_timeout=${PYCRIU_VM_BOOT_TIMEOUT:-180}
mem=${PYCRIU_VM_MEM:-2048}
cpus=${PYCRIU_VM_CPUS:-2}
accel=${PYCRIU_VM_ACCEL:-tcg}
results=${PYCRIU_VM_RESULTS:-$checkout/build/vm}
quiet=${PYCRIU_VM_QUIET:-}
say() { printf '\033[1mvm:\033[0m %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 1; }

[ $# -gt 0 ] || die "usage: $0 COMMAND [ARG...] (run in $checkout inside the guest)"
[ "$(id -u)" = 0 ] || die "run as root (the guest's 9p shares pass the host's ownership through)"
case $accel in
tcg) accel_opts=(-accel tcg,thread=multi -cpu max) ;;
kvm) accel_opts=(-accel kvm -cpu host) ;;
*) die "PYCRIU_VM_ACCEL=$accel: tcg or kvm" ;;
esac

eval "$(bash "$here/build.sh")" # KERNEL_VERSION VMLINUZ INITRD MODULES

rm -rf "$results" && mkdir -p "$results"
{
	printf 'cd %q || exit 125\n' "$checkout"
	printf 'exec'
	printf ' %q' "$@"
	printf '\n'
} >"$results/job.sh"
printf 'MODULES=%q\nJOB_TIMEOUT=%q\n' "$MODULES" "$timeout_s" >"$results/job.env"
console=$results/console.log
: >"$console"

say "booting Debian's kernel $KERNEL_VERSION ($accel, $cpus CPUs, $mem MiB): $*"
start=$(date +%s)
# The host's root read-only (the guest overlays it with a tmpfs), the results directory writable.
# multidevs=remap: the root share spans several host filesystems; keep their inode numbers apart.
qemu-system-x86_64 "${accel_opts[@]}" -smp "$cpus" -m "$mem" -nodefaults -no-user-config -no-reboot \
	-display none -monitor none -serial "file:$console" -nic none \
	-kernel "$VMLINUZ" -initrd "$INITRD" \
	-append "console=ttyS0 loglevel=6 panic=-1 pycriu.guest=$here/guest.sh" \
	-fsdev "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap" \
	-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
	-fsdev "local,id=results,path=$results,security_model=passthrough" \
	-device virtio-9p-pci,fsdev=results,mount_tag=results &
qemu=$!
tailer=
if [ -z "$quiet" ]; then
	# The kernel's own lines ("[    1.234] ...") stay in the file; the guest script's and the job's show.
	tail -n +1 -F --pid=$qemu "$console" 2>/dev/null | grep --line-buffered -v '^\[ *[0-9]*\.[0-9]*\]' &
	tailer=$!
fi
stop_qemu() { kill "$qemu" 2>/dev/null || true; wait "$qemu" 2>/dev/null || true; }
trap 'stop_qemu; [ -n "$tailer" ] && kill "$tailer" 2>/dev/null; exit 130' INT TERM

fail() {
	stop_qemu
	[ -n "$tailer" ] && { sleep 0.5; kill "$tailer" 2>/dev/null || true; }
	echo "----- guest console ($console, last 150 lines) -----" >&2
	tail -n 150 "$console" >&2
	echo "----- end of guest console -----" >&2
	die "$* (guest console: $console)"
}

# Up when the guest script says so; then the command has its own timeout inside the guest, and
# the host allows it a minute more to bring back the logs and power off.
up=
while kill -0 "$qemu" 2>/dev/null; do
	if grep -q '^pycriu-vm: kernel ' "$console"; then up=1; break; fi
	[ $(($(date +%s) - start)) -lt "$boot_timeout" ] || fail "the guest did not come up within $boot_timeout s"
	sleep 1
done
[ -n "$up" ] || fail "the guest ended before it came up"
say "guest up after $(($(date +%s) - start)) s"
deadline=$(($(date +%s) + timeout_s + 60))
while kill -0 "$qemu" 2>/dev/null; do
	[ "$(date +%s)" -lt "$deadline" ] || fail "the guest did not power off within $timeout_s s of the command's start"
	sleep 1
done
wait "$qemu" || true
[ -n "$tailer" ] && { sleep 0.5; kill "$tailer" 2>/dev/null || true; wait "$tailer" 2>/dev/null || true; }
[ -f "$results/rc" ] || fail "the guest powered off without the command's exit status"
rc=$(cat "$results/rc")
[ -n "$quiet" ] && cat "$results/output.log"
say "guest done after $(($(date +%s) - start)) s: status $rc; output, logs and console in $results"
[ "$rc" = 124 ] && fail "the command timed out in the guest after $timeout_s s"
exit "$rc"
