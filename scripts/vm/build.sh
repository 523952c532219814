#!/usr/bin/env bash
# Build what the test VM boots, idempotently, from a fresh Debian 12 machine:
#
#   1. Debian packages: qemu-system-x86 (the emulator), busybox-static (the initramfs), kmod (depmod).
#   2. Debian 12's own kernel: the package linux-image-amd64 depends on, fetched with
#      `apt-get download` through this machine's apt configuration (the archive signature and the
#      package's checksum are checked by apt), unpacked (never installed), modules indexed by depmod.
#   3. A tiny initramfs: static busybox, the virtio/9p/overlay modules and scripts/vm/init.
#
# Everything is cached under $PYCRIU_CACHE/vm: a second run downloads nothing. Prints the
# variables run.sh reads (KERNEL_VERSION, VMLINUZ, INITRD, MODULES).
#
# Environment: PYCRIU_CACHE (/var/cache/pycriu), PYCRIU_VM_KERNEL (a package name such as
# linux-image-6.1.0-57-amd64; default: the one already cached, else what linux-image-amd64 depends on).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${PYCRIU_CACHE:-/var/cache/pycriu}/vm
say() { printf '\033[1mvm-build:\033[0m %s\n' "$*" >&2; }
die() { printf 'vm-build: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: installing qemu and fetching the kernel package needs it"

# --- 1. Debian packages --------------------------------------------------------------------
deps=(qemu-system-x86 busybox-static kmod)
missing=()
for p in "${deps[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "installing Debian packages: ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. The kernel package -----------------------------------------------------------------
# Which package: the one asked for, else the newest already unpacked (no apt at all), else the
# one Debian 12's linux-image-amd64 depends on today.
resolve_kernel() {
	apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}
pkg=${PYCRIU_VM_KERNEL:-}
if [ -z "$pkg" ]; then
	pkg=$(find "$cache/kernel" -mindepth 2 -maxdepth 2 -name .unpacked -printf '%h\n' 2>/dev/null |
		xargs -r -n1 basename | sort -V | tail -n1 || true)
fi
if [ -z "$pkg" ]; then
	pkg=$(resolve_kernel)
	if [ -z "$pkg" ]; then
		apt-get update -qq
		pkg=$(resolve_kernel)
	fi
	[ -n "$pkg" ] || die "apt knows no linux-image-amd64 (is this Debian 12 with its main component?)"
fi
case $pkg in linux-image-[0-9]*) ;; *) die "PYCRIU_VM_KERNEL=$pkg is not a linux-image-VERSION package" ;; esac
version=${pkg#linux-image-}
tree=$cache/kernel/$pkg
if [ ! -f "$tree/.unpacked" ]; then
	mkdir -p "$cache/debs"
	deb=$(ls "$cache/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
	if [ -z "$deb" ]; then
		say "downloading $pkg (about 70 MB) with apt-get download"
		# APT::Sandbox::User=root: the cache directory is root's; apt checks the package against the
		# signed index as for any install.
		(cd "$cache/debs" && apt-get -o APT::Sandbox::User=root download -qq "$pkg") ||
			die "apt-get download $pkg failed (apt-get update, or set PYCRIU_VM_KERNEL to a package apt has)"
		deb=$(ls "$cache/debs/${pkg}"_*.deb | sort -V | tail -n1)
	fi
	say "unpacking $(basename "$deb")"
	rm -rf "$tree" && mkdir -p "$tree"
	dpkg-deb -x "$deb" "$tree"
	depmod -b "$tree" "$version"
	touch "$tree/.unpacked"
fi
vmlinuz=$tree/boot/vmlinuz-$version
modules=$tree/lib/modules/$version
[ -f "$vmlinuz" ] && [ -d "$modules" ] || die "$tree holds no kernel $version: remove it and run again"
grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$tree/boot/config-$version" ||
	die "$pkg has no CONFIG_MEM_SOFT_DIRTY: the guest could not test pre-copy"

# --- 3. The initramfs ----------------------------------------------------------------------
# The modules the init needs to mount the host's root over virtio-9p with a tmpfs overlay, in the
# order of their dependencies (all built as modules in Debian's kernel).
initrd_modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache
	9pnet 9pnet_virtio 9p overlay)
busybox=/bin/busybox
initrd=$cache/initrd-$version.cpio.gz
stamp=$(cat "$here/init" "$busybox" | sha256sum | awk '{print $1}')-$version-${initrd_modules[*]}
if [ ! -f "$initrd" ] || [ "$(cat "$initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
	say "building the initramfs for $version"
	staging=$(mktemp -d)
	trap 'rm -rf "$staging"' EXIT
	mkdir -p "$staging"/{bin,dev,proc,sys,newroot,modules}
	cp "$busybox" "$staging/bin/busybox"
	cp "$here/init" "$staging/init" && chmod 755 "$staging/init"
	: >"$staging/modules/order"
	for m in "${initrd_modules[@]}"; do
		ko=$(modinfo -b "$tree" -k "$version" -n "$m") || die "module $m is not in $pkg"
		case $ko in *.ko) ;; *) die "module $m is $ko: the initramfs's insmod needs it uncompressed" ;; esac
		cp "$ko" "$staging/modules/$m.ko"
		echo "$m" >>"$staging/modules/order"
	done
	(cd "$staging" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -9 >"$initrd.tmp")
	mv "$initrd.tmp" "$initrd"
	echo "$stamp" >"$initrd.stamp"
fi

printf 'KERNEL_VERSION=%s\nVMLINUZ=%s\nINITRD=%s\nMODULES=%s\n' "$version" "$vmlinuz" "$initrd" "$tree/lib/modules"
