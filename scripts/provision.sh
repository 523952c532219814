#!/usr/bin/env bash
# Provision everything pycriu needs on a Debian 12 machine, idempotently.
#
#   1. Debian packages: CRIU's build dependencies, and the tools the tests and demo use.
#   2. CRIU >= 4.2 (criu, libcriu.so, headers, criu.pc) under $PYCRIU_CRIU_PREFIX (/usr/local).
#      A system CRIU is used only when it is new enough and `criu check` passes on this kernel;
#      otherwise a pinned release is built from Debian's source package, verified against the
#      checksum in its .dsc, and cached so that a second run takes seconds.
#   3. Runtime prerequisites (see docs/install.rst).
#   4. A virtual environment in the checkout (.venv) with pycriu and its compiled extension.
#
# Environment: PYCRIU_CRIU_VERSION (4.2.1), PYCRIU_CRIU_PREFIX (/usr/local),
# PYCRIU_CACHE (/var/cache/pycriu), PYTHON (python3), PYCRIU_VENV (.venv in the checkout).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
criu_version=${PYCRIU_CRIU_VERSION:-4.2.1}
criu_min=4.2
prefix=${PYCRIU_CRIU_PREFIX:-/usr/local}
cache=${PYCRIU_CACHE:-/var/cache/pycriu}
python=${PYTHON:-python3}
venv=${PYCRIU_VENV:-$here/.venv}
# Debian suites searched, in order, for the pinned CRIU source package.
suites=${PYCRIU_CRIU_SUITES:-"sid forky trixie"}

say() { printf '\033[1mprovision:\033[0m %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: installing packages and CRIU needs it (sudo make setup)"

# --- 1. Debian packages --------------------------------------------------------------------
build_deps=(build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
	libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
	protobuf-compiler uuid-dev xz-utils dpkg-dev)
# The tests and demo use: iproute2 (network namespaces, veth, tc), util-linux (unshare),
# procps (sysctl), OpenSSH (the ssh:// transport), openssl (test certificates), python3-venv and
# headers (the venv), git (setuptools-scm reads the version from it), make (the README's commands),
# runc and busybox-static (the container tests: a real OCI runtime over a busybox rootfs).
tool_deps=(iproute2 util-linux procps openssh-client openssh-server openssl python3-venv python3-dev
	iptables nftables git make ca-certificates runc busybox-static)
missing=()
for p in "${build_deps[@]}" "${tool_deps[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "installing Debian packages: ${missing[*]}"
	apt-get update -qq
	# openssh-server is only a binary for the tests' own sshd on loopback: keep the package from
	# starting a system sshd (policy-rc.d 101 = "action forbidden", honoured by invoke-rc.d).
	policy=/usr/sbin/policy-rc.d made_policy=
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
		trap 'rm -f "$policy"' EXIT
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	if [ -n "$made_policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi

# --- 2. CRIU --------------------------------------------------------------------------------
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

criu_usable() { # $1: criu binary. True when new enough, libcriu matches, and `criu check` passes.
	local bin=$1 v
	[ -x "$bin" ] || return 1
	v=$("$bin" --version 2>/dev/null | awk '/^Version:/{print $2}')
	[ -n "$v" ] && version_ge "$v" "$criu_min" || return 1
	v=$(PKG_CONFIG_PATH="$(criu_pc_path)" pkg-config --modversion criu 2>/dev/null) || return 1
	version_ge "$v" "$criu_min" || return 1
	"$bin" check >/dev/null 2>&1
}

criu_pc_path() {
	local multiarch
	multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || true)
	printf '%s' "$prefix/lib/$multiarch/pkgconfig:$prefix/lib/pkgconfig:$prefix/lib64/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
}

# Fetch the .dsc and .orig.tar.xz of criu=$criu_version-* from Debian's source packages, using the
# mirror this machine's own apt configuration names, without touching the system's package lists.
fetch_criu_source() {
	local dir=$1 aptdir=$cache/apt uris uri suite
	mkdir -p "$aptdir/lists/partial" "$aptdir/parts" "$dir"
	uris=$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true
		grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{for(i=2;i<=NF;i++) if ($i ~ /:\/\//) {print $i; break}}' || true) |
		grep -v -- '-security' | head -n1 || true)
	[ -n "$uris" ] || die "no Debian mirror found in /etc/apt: cannot fetch CRIU's source package"
	: >"$aptdir/sources.list"
	for suite in $suites; do
		for uri in $uris; do
			echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >>"$aptdir/sources.list"
		done
	done
	# Signatures are checked as usual. Valid-Until is not: we fetch one pinned version and verify
	# its tarball against the signed .dsc, so an index older than its validity date (a snapshot
	# mirror) is still fine for that.
	local aptopts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/parts"
		-o "Dir::State::Lists=$aptdir/lists" -o "APT::Sandbox::User=root"
		-o "Acquire::Check-Valid-Until=false")
	say "fetching the source index of Debian suites: $suites"
	apt-get "${aptopts[@]}" update -qq
	local full
	full=$(apt-cache "${aptopts[@]}" showsrc criu | awk '/^Version:/{print $2}' | grep "^$criu_version-" | sort -V | tail -n1)
	[ -n "$full" ] || die "criu $criu_version is in none of the suites $suites; set PYCRIU_CRIU_VERSION"
	say "downloading criu $full source"
	# The .debian.tar.xz may be missing from the mirror; the .dsc and the upstream tarball suffice.
	(cd "$dir" && apt-get "${aptopts[@]}" source --download-only "criu=$full" >/dev/null 2>&1 || true)
	ls "$dir"/criu_"$criu_version".orig.tar.* >/dev/null 2>&1 || die "download of criu $full source failed"
}

verify_criu_source() { # The .dsc came through apt's signed index; check the tarball against it.
	local dir=$1 dsc tarball name sum size expect
	dsc=$(ls "$dir"/criu_"$criu_version"-*.dsc | sort -V | tail -n1)
	tarball=$(ls "$dir"/criu_"$criu_version".orig.tar.* | head -n1)
	name=$(basename "$tarball")
	# The Checksums-Sha256 line that names exactly this file: "<sha256> <size> <name>".
	read -r expect size < <(awk -v n="$name" '/^Checksums-Sha256:/{f=1;next} /^[^ ]/{f=0} f && $3 == n {print $1, $2}' "$dsc")
	sum=$(sha256sum "$tarball" | awk '{print $1}')
	if [ -z "${expect:-}" ] || [ "$sum" != "$expect" ] || [ "$(stat -c %s "$tarball")" != "$size" ]; then
		rm -rf "$dir" # never keep (or reuse) a source that failed verification
		die "checksum mismatch for $name (got $sum, $(basename "$dsc") says ${expect:-nothing}); removed it, run again"
	fi
	say "verified $name sha256 $sum"
}

build_criu() {
	local src=$cache/src/criu-$criu_version build=$cache/build/criu-$criu_version
	if [ ! -f "$build/.built" ]; then
		ls "$src"/criu_"$criu_version"-*.dsc >/dev/null 2>&1 || fetch_criu_source "$src"
		verify_criu_source "$src"
		rm -rf "$build" && mkdir -p "$build"
		tar -xf "$(ls "$src"/criu_"$criu_version".orig.tar.* | head -n1)" -C "$build" --strip-components=1
		say "building criu $criu_version (criu and libcriu only)"
		make -C "$build" -j"$(nproc)" criu lib >"$build/build.log" 2>&1 || { tail -n 30 "$build/build.log"; die "CRIU build failed, log: $build/build.log"; }
		touch "$build/.built"
	fi
	# SKIP_PIP_INSTALL: never install CRIU's own Python module, which is also named pycriu.
	say "installing criu $criu_version under $prefix"
	make -C "$build" install-criu install-lib PREFIX="$prefix" SKIP_PIP_INSTALL=1 >"$build/install.log" 2>&1 ||
		{ tail -n 30 "$build/install.log"; die "CRIU install failed"; }
	ldconfig
}

criu_bin=$prefix/sbin/criu
if criu_usable "$criu_bin"; then
	say "criu $("$criu_bin" --version | awk '/^Version:/{print $2}') at $criu_bin is usable"
elif command -v criu >/dev/null && criu_usable "$(command -v criu)"; then
	criu_bin=$(command -v criu)
	say "using system criu at $criu_bin"
else
	build_criu
	criu_usable "$criu_bin" || { "$criu_bin" check || true; die "criu $criu_version was installed but does not work here"; }
fi

# --- 3. Runtime prerequisites ----------------------------------------------------------------
# CRIU's lazy page server sizes its pipes with fcntl(F_SETPIPE_SZ, 4 MiB). Without
# CAP_SYS_RESOURCE that fails above fs.pipe-max-size (1 MiB by default) and lazy migration breaks
# ("page-pipe: splice: -1: Bad file descriptor"). Raise the limit to 4 MiB if it is lower.
pipe_max=$(cat /proc/sys/fs/pipe-max-size)
if [ "$pipe_max" -lt 4194304 ]; then
	say "raising fs.pipe-max-size from $pipe_max to 4194304 (CRIU's lazy page server needs 4 MiB pipes)"
	echo 4194304 >/proc/sys/fs/pipe-max-size
fi

# --- 4. The Python package -------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
	say "creating virtual environment $venv"
	"$python" -m venv "$venv"
fi
stamp=$venv/.pycriu-installed
# Reinstall when the build inputs changed (declarations, build glue, packaging metadata).
inputs=$(cd "$here" && cat setup.py pyproject.toml csrc/*.py csrc/decl/*.h pycriu/images/*.pyx 2>/dev/null | sha256sum | awk '{print $1}')
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs-$criu_bin" ] ||
	! "$venv/bin/python" -c 'import pycriu._libcriu, pycriu.images._scan' 2>/dev/null; then
	say "installing pycriu into $venv"
	"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null
	PKG_CONFIG_PATH="$(criu_pc_path)" "$venv/bin/python" -m pip install -q -e "$here[test,docs,dev,bench]"
	echo "$inputs-$criu_bin" >"$stamp"
fi
say "ready: criu at $criu_bin, pycriu in $venv"
