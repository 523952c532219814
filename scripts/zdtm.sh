#!/bin/bash
# Build CRIU's zdtm test programs (its own conformance suite) out of the provisioned CRIU source.
# The source tree under /var/cache/pycriu/build stays untouched: test/zdtm is copied to
# build/zdtm of this checkout and built there. Arguments: test names (default: all of static/).
# Idempotent: make rebuilds only what changed.
set -euo pipefail
SRC=${PYCRIU_CRIU_SRC:-/var/cache/pycriu/build/criu-4.2.1}
DEST=${PYCRIU_ZDTM_DIR:-$(cd "$(dirname "$0")/.." && pwd)/build/zdtm}
if [ ! -d "$SRC/test/zdtm/static" ]; then
    echo "zdtm.sh: no CRIU source at $SRC (run scripts/provision.sh)" >&2
    exit 1
fi
mkdir -p "$DEST"
if [ ! -f "$DEST/.copied" ]; then
    cp -a "$SRC/test/zdtm/." "$DEST/"
    touch "$DEST/.copied"
fi
JOBS=$(nproc)
make -s -C "$DEST/lib" -j"$JOBS" >/dev/null
cd "$DEST/static"
if [ $# -eq 0 ]; then
    set -- $(ls *.desc 2>/dev/null | sed 's/\.desc$//'; ls *.c | sed 's/\.c$//')
    set -- $(printf '%s\n' "$@" | sort -u)
fi
# Build each test on its own: one that does not compile on this host is reported, not fatal.
for t in "$@"; do
    [ -f "$t.c" ] || continue
    make -s -j"$JOBS" "$t" >/dev/null 2>"$t.build.err" || echo "zdtm.sh: $t does not build (see $DEST/static/$t.build.err)" >&2
done
