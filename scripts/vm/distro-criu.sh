#!/usr/bin/env bash
# Fetch Debian 12's own CRIU for the test VM, idempotently: the `criu` package (CRIU 3.17.1 with
# libcriu, its header and criu.pc) and python3-protobuf (its one dependency this machine lacks),
# with `apt-get download` through this machine's apt configuration (apt checks them against the
# signed archive index). Never installed here: scripts/vm/with-distro-criu.sh installs them inside
# the guest, whose root is a throw-away overlay. Cached under $PYCRIU_CACHE/vm/distro-criu; a
# second run downloads nothing. Prints the directory holding the .deb files.
set -euo pipefail

cache=${PYCRIU_CACHE:-/var/cache/pycriu}/vm/distro-criu
say() { printf '\033[1mvm-distro:\033[0m %s\n' "$*" >&2; }
die() { printf 'vm-distro: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the cache directory is root's)"
packages=(criu python3-protobuf)
mkdir -p "$cache"
for p in "${packages[@]}"; do
	if ! ls "$cache/${p}"_*.deb >/dev/null 2>&1; then
		say "downloading Debian's $p with apt-get download"
		(cd "$cache" && apt-get -o APT::Sandbox::User=root download -qq "$p") || {
			apt-get update -qq
			(cd "$cache" && apt-get -o APT::Sandbox::User=root download -qq "$p")
		} || die "apt-get download $p failed (is this Debian 12 with its main component?)"
	fi
done

# The guest rebuilds pycriu against that libcriu offline and without build isolation (it has no
# registry): the build requirements of pyproject.toml must be in the venv. Installed here, online.
here=$(cd "$(dirname "$0")/../.." && pwd)
py=$here/.venv/bin/python
[ -x "$py" ] || die "no $py: run make setup first"
mapfile -t reqs < <("$py" -c 'import sys, tomllib; print(*tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"], sep="\n")' \
	"$here/pyproject.toml")
if ! "$py" -m pip install -q --dry-run --no-index "${reqs[@]}" >/dev/null 2>&1; then
	say "installing pycriu's build requirements into the venv (the guest rebuilds it offline): ${reqs[*]}"
	"$py" -m pip install -q "${reqs[@]}" >&2 || die "pip could not install ${reqs[*]}"
fi
echo "$cache"
