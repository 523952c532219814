#!/usr/bin/env bash
# Run the whole test suite again and again, under the conditions a fresh, loaded machine brings,
# and stop at the first red run (its log is kept). `make test-stress` runs it.
#
#   fresh  a new clone of HEAD with its own new venv (provisioned by its own `make test`),
#          CRIU's kernel-feature cache dropped: the first run of a new machine
#   idle   the suite alone
#   cpu    one busy loop per CPU beside the suite
#   io     a writer of 256 MiB files with O_DIRECT and fsync beside the suite (page cache and
#          disk queue under pressure)
#
# Every run is inside `unshare --pid --fork --mount-proc setsid`, as CI runs .ci/run.
# Environment: STRESS_ROUNDS (3: rounds of all conditions), STRESS_CONDITIONS ("fresh idle cpu io"),
# STRESS_LOGS (/var/tmp/pycriu-stress), PYTEST_ARGS (passed to every run).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${STRESS_ROUNDS:-3}
conditions=${STRESS_CONDITIONS:-"fresh idle cpu io"}
logs=${STRESS_LOGS:-/var/tmp/pycriu-stress}/$(date +%Y%m%d-%H%M%S)
mkdir -p "$logs"
work=$(mktemp -d /var/tmp/pycriu-stress-clone.XXXXXX)
chmod 755 "$work"  # mktemp makes it 0700: the suite runs a check as uid 65534 from the clone
loads=()

say() { printf '\033[1mstress:\033[0m %s\n' "$*"; }

stop_load() {
	local pid
	for pid in "${loads[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
	for pid in "${loads[@]}"; do wait "$pid" 2>/dev/null || true; done
	loads=()
	rm -f "$work"/io.*
}
trap 'stop_load; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

start_load() { # $1: condition. Each load runs in its own process group, so that one kill ends it.
	local i
	case $1 in
	cpu)
		for ((i = 0; i < $(nproc); i++)); do
			setsid bash -c 'while :; do :; done' & loads+=($!)
		done ;;
	io)
		setsid bash -c 'while :; do dd if=/dev/zero of="$0/io.$$" bs=1M count=256 oflag=direct conv=fsync status=none; rm -f "$0/io.$$"; done' "$work" &
		loads+=($!) ;;
	esac
}

commit=$(git -C "$here" rev-parse HEAD)  # every run tests this commit, even if HEAD moves meanwhile
clone() { # a new clone at $commit (uncommitted changes are not part of a stress run)
	rm -rf "$work/src"
	git -C "$here" clone --quiet --no-local "$here" "$work/src"
	git -C "$work/src" checkout --quiet --detach "$commit"
}

clone
green=0 total=0
for ((round = 1; round <= rounds; round++)); do
	for cond in $conditions; do
		total=$((total + 1))
		log="$logs/$round-$cond.log"
		if [ "$cond" = fresh ]; then
			clone
			rm -rf /dev/shm/pycriu  # CRIU's kernel-feature cache (pycriu.kdat): probed anew
		fi
		start_load "$cond"
		start=$(date +%s)
		set +e
		unshare --pid --fork --mount-proc setsid \
			make -C "$work/src" test PYTEST_ARGS="${PYTEST_ARGS:-}" </dev/null >"$log" 2>&1
		rc=$?
		set -e
		stop_load
		summary=$(grep -E '^=+ .*(passed|failed|error).* in ' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
		say "round $round, $cond: exit $rc in $(($(date +%s) - start)) s: ${summary:-no pytest summary}"
		if [ "$rc" != 0 ]; then
			say "RED after $green consecutive green runs; log: $log"
			grep -E '^(FAILED|ERROR) ' "$log" | head -n 20 || true
			exit 1
		fi
		green=$((green + 1))
	done
done
say "$green of $total runs of ${commit:0:12} green in a row (conditions: $conditions; logs: $logs)"
