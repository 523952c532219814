"""``python -m bench``: the migration benchmark of issue 4 (see docs/benchmarks.rst).

::

    python -m bench --sizes 64,256,1024 --rates idle,busy --links lo,netem \\
        --modes classic,page-server,lazy,page-server-on-source --repeat 3
    python -m bench --quick          # smallest size, lo only, idle, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import flows, netns, report, runner

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: pycriu-stopped: pycriu on lo with same_host_rollback="stopped-source" (the source kept frozen
#: as the rollback instead of its images), beside the default pycriu in the same run
IMPLS = ("pycriu", "baseline", "pycriu-stopped")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024", help="workload sizes in MiB (default: %(default)s)")
    ap.add_argument("--rates", default="idle,busy",
                    help="write rates: idle (0), busy (--busy-rate), or a fraction of memory per second")
    ap.add_argument("--busy-rate", type=float, default=runner.RATES["busy"],
                    help="fraction of memory rewritten per second by a 'busy' workload (default: %(default)s)")
    ap.add_argument("--links", default="lo,netem", help="lo and/or netem (default: %(default)s)")
    ap.add_argument("--modes", default="classic,page-server,lazy,page-server-on-source,pre-copy,hybrid",
                    help="flows to measure; pre-copy and hybrid are skipped (with the reason) where the kernel "
                         "cannot track dirty memory (default: %(default)s)")
    ap.add_argument("--impls", default="pycriu,baseline",
                    help="pycriu, baseline (the documented criu CLI flow) and/or pycriu-stopped (pycriu keeping "
                         "the stopped source as the rollback on lo: same_host_rollback='stopped-source') "
                         "(default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of every cell (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="prove the harness works: smallest size, lo only, idle, 1 repeat, small reference")
    ap.add_argument("--ref-mib", type=int, default=256, help="MiB streamed to measure each link (default: %(default)s)")
    ap.add_argument("--verbosity", type=int, default=3, choices=range(0, 5),
                    help="CRIU log level of the CLI flows, -vN (default: %(default)s, the level pycriu's flows "
                         "use: LogLevel.INFO)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where images and heartbeat files go (default: a new directory in /var/tmp)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)")
    ap.add_argument("--no-verify", action="store_true", help="skip checking every page of the migrated workload")
    ap.add_argument("--keep", action="store_true", help="keep each trial's images and logs")
    ap.add_argument("--settle", type=float, default=None, metavar="S",
                    help="seconds every trial waits after the previous one (default: 3 where the kernel "
                         "reports free memory to the hypervisor, else 0; 0 with --quick)")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in _csv(args.sizes)]
    args.rates = _csv(args.rates)
    args.links = _csv(args.links)
    args.modes = _csv(args.modes)
    args.impls = _csv(args.impls)
    if args.settle is not None and args.settle < 0:
        ap.error("--settle must be 0 or more seconds")
    if args.quick:
        args.sizes = [min(args.sizes)]
        args.links = ["lo"]
        args.rates = ["idle"] if "idle" in args.rates else args.rates[:1]
        args.repeat = 1
        args.ref_mib = min(args.ref_mib, 64)
        if args.settle is None:
            args.settle = 0.0  # proving the harness works compares nothing
    for link in args.links:
        if link not in ("lo", "netem"):
            ap.error(f"unknown link {link!r} (lo, netem)")
    for mode in args.modes:
        if mode not in flows.MODES:
            ap.error(f"unknown mode {mode!r} ({', '.join(flows.MODES)})")
    for impl in args.impls:
        if impl not in IMPLS:
            ap.error(f"unknown implementation {impl!r} ({', '.join(IMPLS)})")
    for rate in args.rates:
        if rate not in runner.RATES:
            try:
                float(rate)
            except ValueError:
                ap.error(f"unknown rate {rate!r} (idle, busy, or a number)")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("python -m bench needs root (CRIU, network namespaces)", file=sys.stderr)
        return 2
    if any(i.startswith("pycriu") for i in args.impls):
        try:
            import pycriu.migration  # noqa: F401
        except ImportError as exc:
            print(f"pycriu.migration is not available ({exc}): running the baseline only", file=sys.stderr)
            args.impls = [i for i in args.impls if not i.startswith("pycriu")]
            if not args.impls:
                return 2
    if runner.sysctl_pipe_max() < 4 << 20 and any(m in flows.LAZY_MODES for m in args.modes):
        print("warning: fs.pipe-max-size < 4 MiB: CRIU's lazy page server fails (see PLATFORM.md); "
              "run `sysctl -w fs.pipe-max-size=4194304` (make setup does)", file=sys.stderr)

    # One run at a time: the namespaces have fixed names, and a second run would delete them.
    lock = open("/run/lock/pycriu-bench.lock", "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another `python -m bench` is running; waiting for it to finish", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)

    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="pycriu-bench-", dir="/var/tmp")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runner.become_subreaper()
    runner.install_stop_handlers()

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg = runner.Config(sizes=args.sizes, rates=args.rates, links=args.links, modes=args.modes, repeat=args.repeat,
                        impls=args.impls, workdir=workdir, verbosity=args.verbosity, ref_mib=args.ref_mib,
                        verify=not args.no_verify, keep=args.keep, busy_rate=args.busy_rate,
                        settle=runner.default_settle() if args.settle is None else args.settle, log=log)
    t0 = time.monotonic()
    interrupted = False
    try:
        with netns.topology() as links:
            run = runner.Runner(cfg, links)
            try:
                env = runner.environment(run.criu)
                refs = run.link_references()
                try:
                    run.run()
                except KeyboardInterrupt:
                    # Ctrl-C / SIGTERM: the current trial cleaned up after itself; report what ran
                    interrupted = True
                    log("interrupted: cleaning up and writing the trials done so far")
                if not interrupted:
                    for name, m in run.link_references().items():  # again at the end: the machine is noisy
                        refs[name]["throughput_end"] = m["throughput_start"]
            finally:
                run.close()
    finally:
        runner.kill_leftover_children()
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    records = run.records
    for r in refs.values():
        ends = [m["bytes_per_s"] for k, m in r.items() if k.startswith("throughput_") and isinstance(m, dict)]
        r["throughput_bytes_per_s"] = sum(ends) / len(ends)
    env["loadavg_end"] = os.getloadavg()
    summary = report.summarise(records, refs)
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "duration_s": time.monotonic() - t0,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "config": {"sizes": args.sizes, "rates": args.rates, "busy_rate": args.busy_rate, "links": args.links,
                   "modes": args.modes, "impls": args.impls, "repeat": args.repeat, "ref_mib": args.ref_mib,
                   "cli_verbosity": args.verbosity, "heartbeat_interval_ms": 1.0, "settle_s": cfg.settle,
                   "free_page_reporting": runner.free_page_reporting()},
        "environment": env,
        "links": refs,
        "skipped": run.skips(),
        "trials": records,
        "summary": summary,
        "targets": report.check_targets(summary),
    }
    paths = report.write(doc, args.out, stamp)
    print()
    print(report.markdown(doc))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    if interrupted:
        return 130
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
