#!/usr/bin/env bash
# Inside the test VM only: make the guest a Debian 12 machine as its users have it, with the
# distribution's own CRIU (3.17.1, scripts/vm/distro-criu.sh fetched it), then run a command.
#
#   scripts/vm/with-distro-criu.sh DEBDIR COMMAND [ARG...]
#
# 1. The provisioned CRIU 4.2 under /usr/local is removed from the guest's view (the guest's root
#    is a tmpfs overlay over the host's: nothing on the host changes).
# 2. Debian's packages are installed with dpkg, as `apt install criu` would.
# 3. pycriu's extension is rebuilt against that libcriu (pip install -e, offline, as provisioning
#    builds it), so what an older libcriu lacks is found at build time (PYCRIU_HAS_* flags).
# 4. COMMAND runs with $PYCRIU_CRIU=/usr/sbin/criu.
set -euo pipefail

say() { echo "pycriu-vm-distro: $*"; }
die() { echo "pycriu-vm-distro: error: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 DEBDIR COMMAND [ARG...]"
[ -d /run/pycriu-vm ] && [ "$(hostname)" = pycriu-vm ] ||
	die "this replaces the machine's CRIU: run it only inside the test VM (scripts/vm/run.sh)"
debs=$1
shift
ls "$debs"/criu_*.deb >/dev/null 2>&1 || die "no criu_*.deb in $debs (scripts/vm/distro-criu.sh fetches it)"

say "removing the provisioned CRIU 4.2 from the guest's view"
rm -f /usr/local/sbin/criu /usr/local/sbin/criu-ns /usr/local/lib/x86_64-linux-gnu/libcriu.* \
	/usr/local/lib/x86_64-linux-gnu/pkgconfig/criu.pc
rm -rf /usr/local/include/criu
ldconfig
say "installing $(cd "$debs" && echo *.deb)"
# no triggers: man-db's index rebuild alone takes many minutes under emulation
DEBIAN_FRONTEND=noninteractive dpkg --no-triggers -i "$debs"/*.deb >/dev/null
say "$(criu --version | head -n1) from Debian's package ($(dpkg-query -W -f='${Version}' criu)); criu check: $(criu check 2>&1 | tail -n1)"

say "rebuilding pycriu's extension against Debian's libcriu"
rm -f pycriu/_libcriu*.so
.venv/bin/python -m pip install -q --no-index --no-build-isolation --no-deps -e . >/dev/null ||
	die "pycriu does not build against Debian's libcriu"
export PYCRIU_CRIU=/usr/sbin/criu
say "pycriu built against libcriu $(.venv/bin/python -c 'from pycriu import _raw; print(*_raw.COMPILED_VERSION, sep="."); print("lacking:", sorted(_raw.MISSING_SETTERS) or "nothing")' 2>&1 | tr '\n' ' ')"
exec "$@"
