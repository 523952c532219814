"""``python -m bench.images``: the checkpoint-inspection benchmark of issue 12.

One run: a tree of ``--procs`` processes holding ``--mib`` MiB in all (``bench/images_workload.c``)
is dumped twice with ``leave_running``, checkpoint B after every process rewrote exactly
``--rewrite`` of its pages. Then, page cache warm, each measurement ``--repeat`` times
(pycriu and its reference alternating), medians:

1. search: ``Memory(A).space(pid).find(needle)`` summed over the pids, against
   ``grep -c -a -F NEEDLE pages-*.img`` over the same files (``LC_ALL=C``), for an absent
   needle (a full scan) and for the workload's marker (present every 256th page);
   ``find_regex`` too (reported, no target; ``grep -c -a -E`` beside it);
2. diff: ``pycriu.images.diff.diff(Memory(A), Memory(B))``, in bytes of B's pages per second,
   with the changed pages it found against the pages the workload rewrote;
3. inspect: ``pycriu inspect A --json`` (a subprocess) against CRIU's own ``crit x A ps`` plus
   ``crit x A mems`` (CRIU's crit and CRIU's Python module, from the provisioned source).

Targets: search within 2x of grep and >= 1 GB/s, diff >= 1 GB/s, inspect no slower than the two
crit commands. Writes ``bench/results/images.json`` and ``images.md``.

::

    python -m bench.images                       # 1 GiB, 2 processes, images in /tmp
    python -m bench.images --workdir /dev/shm/x  # images on tmpfs
    python -m bench.images --mib 64 --repeat 1   # prove it works
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycriu
from pycriu.images.diff import diff
from pycriu.images.memory import PAGE_SIZE, Memory
from pycriu.workload import PidNamespaceTree

from .heartbeat import compile_c

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCE = HERE / "images_workload.c"
DEFAULT_OUT = HERE / "results"
CRIU_SRC = Path(os.environ.get("PYCRIU_CRIU_SRC", "/var/cache/pycriu/build/criu-4.2.1"))
CRIU_LIB = CRIU_SRC / "lib"
CRIT = CRIU_SRC / "crit" / "crit"

#: what images_workload.c writes at byte 24 of every --marker-every'th page
MARKER = b"pycriu-bench-marker-0001"
MARKER_EVERY = 256
#: in no page (the pages hold 64-bit words of a hash, and the marker)
ABSENT = b"pycriu: this needle is in no page"
REGEX = rb"pycriu-bench-marker-[0-9]{4}"
GB = 1e9


def build(cc: str | None = None) -> Path:
    """Compile ``images_workload.c`` into ``bench/.build/`` (cached by the source's hash)."""
    return compile_c(SOURCE, "images_workload", cc)


def _tree_pids(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def _wait_files(directory: Path, names: list[str], want: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all((directory / n).read_text().strip() == want or want is None for n in names):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"the workload did not write {', '.join(names)} (= {want}) in {timeout:.0f} s")


def make_checkpoints(binary: Path, work: Path, mib: int, procs: int, rewrite: int,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Start the tree, dump A, have every process rewrite ``rewrite`` pages, dump B; the tree is
    killed on every path."""
    tree_dir = work / "tree"
    tree_dir.mkdir()
    a, b = work / "A", work / "B"
    a.mkdir()
    b.mkdir()
    argv = [str(binary), "--mib", str(mib), "--procs", str(procs), "--rewrite", str(rewrite),
            "--marker-every", str(MARKER_EVERY)]
    tree = PidNamespaceTree(argv, cwd=tree_dir)
    try:
        names = [f"ready-{k}" for k in range(procs)]
        _wait_files(tree_dir, names, None, 30 + mib / 20)
        pids = _tree_pids(tree.pid)
        if len(pids) != procs:
            raise RuntimeError(f"the workload has {len(pids)} processes, wanted {procs}")
        criu = pycriu.Criu()
        times = {}
        for name, d in (("A", a), ("B", b)):
            if name == "B":
                for pid in pids:
                    os.kill(pid, signal.SIGUSR1)
                _wait_files(tree_dir, [f"done-{k}" for k in range(procs)], "1", 60)
            t0 = time.monotonic()
            criu.dump(pycriu.DumpOptions(pid=tree.pid, images_dir=d, leave_running=True, shell_job=True,
                                         log_file="dump.log"))
            times[name] = time.monotonic() - t0
            log(f"dumped {name} in {times[name]:.2f} s")
    finally:
        tree.close()
    pages_per_proc = mib * (1 << 20) // PAGE_SIZE // procs
    return {"A": a, "B": b, "dump_s": times, "pages_per_process": pages_per_proc,
            "markers": procs * len(range(0, pages_per_proc, MARKER_EVERY)),
            "rewritten": procs * min(rewrite, pages_per_proc)}


def page_files(d: Path) -> list[Path]:
    return sorted(d.glob("pages-*.img"))


def warm(d: Path) -> int:
    """Read every file of checkpoint ``d`` once (into the page cache); return the page bytes."""
    total = 0
    for p in sorted(d.iterdir()):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                if p.name.startswith("pages-"):
                    total += len(chunk)
    return total


# -- the measured operations ------------------------------------------------------------------

def pycriu_find(d: Path, needle: bytes) -> dict[str, Any]:
    with Memory(d) as mem:
        count = scanned = 0
        for space in mem.spaces():
            n, _hits = space.find(needle)
            count += n
            scanned += sum(r[1] for r in space.runs())
    return {"count": count, "bytes": scanned}


def pycriu_find_regex(d: Path, pattern: re.Pattern[bytes]) -> dict[str, Any]:
    with Memory(d) as mem:
        count = scanned = 0
        for space in mem.spaces():
            count += space.find_regex(pattern)[0]
            scanned += sum(r[1] for r in space.runs())
    return {"count": count, "bytes": scanned}


def grep(d: Path, *args: str) -> dict[str, Any]:
    files = page_files(d)
    r = subprocess.run(["grep", "-c", "-a", *args, *map(str, files)], capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"})
    if r.returncode not in (0, 1):
        raise RuntimeError(f"grep failed: {r.stderr.strip()}")
    lines = r.stdout.split()
    count = sum(int(line.rpartition(":")[2]) for line in lines) if len(files) > 1 else int(lines[0])
    return {"count": count, "bytes": sum(p.stat().st_size for p in files)}


def pycriu_diff(a: Path, b: Path) -> dict[str, Any]:
    with Memory(a) as ma, Memory(b) as mb:
        result = diff(ma, mb)
        b_bytes = sum(r[1] for s in mb.spaces() for r in s.runs())
        big = [m for m in result.mappings if m.compared + m.new >= 1024]
    return {"bytes": b_bytes, "compared": result.total("compared"), "changed": result.total("changed"),
            "new": result.total("new"), "gone": result.total("gone"),
            "changed_in_data": sum(m.changed for m in big),
            "changed_elsewhere": result.total("changed") - sum(m.changed for m in big)}


def python_env(cache: Path | None) -> dict[str, str]:
    """The environment of the Python subprocesses: bytecode cached under ``cache`` (written by
    the untimed first run, as an installed package has it; nothing is written in the checkout or
    in CRIU's source), or with ``None`` no bytecode written: the standard library and the
    installed packages come from their own ``__pycache__``, the checkout's modules and CRIU's
    are compiled from source at every start."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def pycriu_inspect_cli(d: Path, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "pycriu", "inspect", str(d), "--json"], capture_output=True,
                       text=True, cwd=REPO, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"pycriu inspect failed: {r.stderr.strip()[-2000:]}")
    doc = json.loads(r.stdout)
    return {"processes": len(doc["processes"]), "out_bytes": len(r.stdout)}


def crit_env(tmp: Path, base: dict[str, str]) -> tuple[dict[str, str], Path]:
    """The environment and cwd in which ``python -m crit`` is CRIU's crit on CRIU's module."""
    crit = tmp / "crit"
    if not crit.exists():
        shutil.copytree(CRIT, crit)
        (crit / "version.py").write_text('__version__ = "bench"\n')  # what crit's build writes
    env = {**base, "PYTHONPATH": f"{CRIU_LIB}:{tmp}"}
    which = subprocess.run([sys.executable, "-c", "import pycriu; print(pycriu.__file__)"], capture_output=True,
                           text=True, cwd=tmp, env=env).stdout
    if not which.startswith(str(CRIU_LIB)):
        raise RuntimeError(f"crit would not run on CRIU's module ({which.strip()})")
    return env, tmp


def crit(d: Path, env: dict[str, str], cwd: Path, *what: str) -> dict[str, Any]:
    out = 0
    for w in what:
        r = subprocess.run([sys.executable, "-m", "crit", "x", str(d), w], capture_output=True, text=True,
                           env=env, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"crit x {w} failed: {r.stderr.strip()[-2000:]}")
        out += len(r.stdout)
    return {"out_bytes": out}


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = fn()
    res["s"] = time.perf_counter() - t0
    return res


def measure(cases: dict[str, Callable[[], dict[str, Any]]], repeat: int,
            log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run each case once untimed, then ``repeat`` rounds of every case in turn; medians."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeat):
        for name, fn in cases.items():
            runs[name].append(timed(fn))
    out = {}
    for name, rs in runs.items():
        times = [r["s"] for r in rs]
        med = dict(rs[0])
        med.update(s=statistics.median(times), min_s=min(times), max_s=max(times), all_s=times)
        if "bytes" in med:
            med["gb_per_s"] = med["bytes"] / med["s"] / GB
        out[name] = med
        log(f"  {name}: {med['s'] * 1000:.1f} ms (min {med['min_s'] * 1000:.1f}, max {med['max_s'] * 1000:.1f})"
            + (f", {med['gb_per_s']:.2f} GB/s" if "gb_per_s" in med else ""))
    return out


# -- targets and output -----------------------------------------------------------------------

def targets(r: dict[str, dict[str, Any]], ck: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, limit: str, met: bool, note: str = "") -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": met, "note": note})

    for kind in ("absent", "present"):
        p, g = r[f"find_{kind}"], r[f"grep_{kind}"]
        ratio = p["s"] / g["s"]
        add(f"search, {kind} needle: pycriu / grep -c -a -F", ratio, "<= 2", ratio <= 2,
            f"{p['s'] * 1000:.0f} ms vs {g['s'] * 1000:.0f} ms")
        add(f"search, {kind} needle: pycriu throughput (GB/s)", p["gb_per_s"], ">= 1", p["gb_per_s"] >= 1)
    d = r["diff"]
    add("diff: bytes of B's pages per second (GB/s)", d["gb_per_s"], ">= 1", d["gb_per_s"] >= 1,
        f"changed {d['changed']} pages ({d['changed_in_data']} in the data mappings, rewritten "
        f"{ck['rewritten']}; {d['changed_elsewhere']} elsewhere)")
    i, c = r["inspect_cli"], r["crit_ps_mems"]
    ratio = i["s"] / c["s"]
    add("inspect: pycriu inspect --json / (crit x ps + crit x mems)", ratio, "<= 1", ratio <= 1,
        f"{i['s'] * 1000:.0f} ms vs {c['s'] * 1000:.0f} ms (bytecode cached)")
    if "crit_ps_mems_nocache" in r:
        i, c = r["inspect_cli_nocache"], r["crit_ps_mems_nocache"]
        out[-1]["note"] = (f"{out[-1]['note']}; without bytecode caches {i['s'] * 1000:.0f} ms vs "
                           f"{c['s'] * 1000:.0f} ms ({i['s'] / c['s']:.2f}, not a target)")
    return out


def markdown(doc: dict[str, Any]) -> str:
    env, cfg, r, ck = doc["environment"], doc["config"], doc["results"], doc["checkpoints"]
    gib = ck["page_bytes_A"] / (1 << 30)
    lines = [
        f"# pycriu checkpoint-inspection benchmark, {doc['started']}", "",
        f"CRIU {env['criu_version']}, pycriu {env['pycriu_version']}, kernel {env['kernel']}, {env['cpus']} CPUs, "
        f"git {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}, {env['grep']}, load average "
        f"{env['loadavg_start'][0]:.2f} at the start, {env['loadavg_end'][0]:.2f} at the end, DAMON: {env['damon']}. "
        f"Command: `{doc['command']}`. Checkpoints of {cfg['procs']} processes, {gib:.2f} GiB of pages each, "
        f"in {cfg['workdir_fs']} ({cfg['workdir']}), page cache warm; medians of {cfg['repeat']} runs "
        "(each case once untimed first), pycriu and its reference alternating. GB = 10^9 bytes.", "",
        "| measurement | median ms | min–max ms | GB/s | found |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "find_absent": "`find(absent)` summed over pids", "grep_absent": "`grep -c -a -F absent pages-*.img`",
        "find_present": "`find(marker)` summed over pids", "grep_present": "`grep -c -a -F marker pages-*.img`",
        "find_regex": f"`find_regex({REGEX.decode()})`", "grep_regex": "`grep -c -a -E` same regex",
        "diff": "`diff(Memory(A), Memory(B))`", "inspect_api": "`pycriu.inspect.inspect(A)` (in process)",
        "inspect_cli": "`pycriu inspect A --json` (subprocess)",
        "crit_ps_mems": "`crit x A ps` + `crit x A mems` (CRIU's module)",
        "crit_ps": "`crit x A ps` (CRIU's module)", "crit_mems": "`crit x A mems` (CRIU's module)",
        "inspect_cli_nocache": "`pycriu inspect A --json`, no bytecode cache",
        "crit_ps_mems_nocache": "`crit x A ps` + `crit x A mems`, no bytecode cache",
    }
    for key, label in labels.items():
        m = r.get(key)
        if m is None:
            continue
        found = ""
        if "count" in m:
            found = str(m["count"])
        elif key == "diff":
            found = f"{m['changed']} changed / {m['compared']} compared"
        gbs = f"{m['gb_per_s']:.2f}" if "gb_per_s" in m else ""
        lines.append(f"| {label} | {m['s'] * 1000:.1f} | {m['min_s'] * 1000:.1f}–{m['max_s'] * 1000:.1f} | "
                     f"{gbs} | {found} |")
    lines += ["", f"Expected: {ck['markers']} markers; {ck['rewritten']} pages rewritten between A and B "
              f"(diff: {r['diff']['changed_in_data']} changed in the data mappings, "
              f"{r['diff']['changed_elsewhere']} elsewhere: stacks, libc). grep counts lines, not occurrences.",
              "", "| target | value | limit | met | note |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['limit']} | {'yes' if t['met'] else '**no**'} | "
                     f"{t['note']} |")
    return "\n".join(lines)


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    real = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, fs, *_ = line.split()
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, fstype = mnt, fs
    return fstype


def damon() -> str:
    """What this machine's DAMON does, if anything: a ``pageout`` scheme evicts page cache that
    was not touched for a while, so "warm" holds only for files read shortly before."""
    root = Path("/sys/kernel/mm/damon/admin/kdamonds")
    out = []
    for kd in sorted(root.glob("[0-9]*")):
        try:
            if (kd / "state").read_text().strip() != "on":
                continue
            for scheme in sorted(kd.glob("contexts/*/schemes/*")):
                ctx = scheme.parent.parent
                age = int((scheme / "access_pattern/age/min").read_text())
                aggr_us = int((ctx / "monitoring_attrs/intervals/aggr_us").read_text())
                out.append(f"{(scheme / 'action').read_text().strip()} of {(ctx / 'operations').read_text().strip()} "
                           f"memory idle for {age * aggr_us / 1e6:.0f} s")
        except (OSError, ValueError):
            continue
    return "; ".join(out) or "off"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="memory of the tree in MiB (default: %(default)s)")
    ap.add_argument("--procs", type=int, default=2, help="processes of the tree (default: %(default)s)")
    ap.add_argument("--rewrite", type=float, default=0.125,
                    help="fraction of each process's pages rewritten between A and B (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of every case (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the images go (default: a new directory in /tmp; /dev/shm/... for tmpfs)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.mib < 1 or args.procs < 1 or not 0 <= args.rewrite <= 1:
        ap.error("--repeat, --mib, --procs must be >= 1 and --rewrite in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("python -m bench.images needs root (CRIU)", file=sys.stderr)
        return 2
    has_crit = (CRIT / "__main__.py").exists() and (CRIU_LIB / "pycriu" / "images" / "pb.py").exists()

    def log(msg: str) -> None:
        print(msg, flush=True)

    from . import runner

    started = datetime.datetime.now()
    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="pycriu-bench-images-", dir="/tmp")) if own else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    try:
        binary = build()
        pages_per_proc = args.mib * (1 << 20) // PAGE_SIZE // args.procs
        rewrite = round(pages_per_proc * args.rewrite)
        ck = make_checkpoints(binary, work, args.mib, args.procs, rewrite, log)
        a, b = ck.pop("A"), ck.pop("B")
        ck["page_bytes_A"] = warm(a)
        ck["page_bytes_B"] = warm(b)
        ck["page_files_A"] = [p.name for p in page_files(a)]
        regex = re.compile(REGEX)
        from pycriu.inspect import inspect

        def api() -> dict[str, Any]:
            return {"processes": len(inspect(a).processes)}

        cases: dict[str, Callable[[], dict[str, Any]]] = {
            "find_absent": lambda: pycriu_find(a, ABSENT),
            "grep_absent": lambda: grep(a, "-F", "-e", ABSENT.decode()),
            "find_present": lambda: pycriu_find(a, MARKER),
            "grep_present": lambda: grep(a, "-F", "-e", MARKER.decode()),
            "find_regex": lambda: pycriu_find_regex(a, regex),
            "grep_regex": lambda: grep(a, "-E", "-e", REGEX.decode()),
            "diff": lambda: pycriu_diff(a, b),
            "inspect_api": api,
        }
        cached, uncached = python_env(work / "pycache"), python_env(None)
        cases["inspect_cli"] = lambda: pycriu_inspect_cli(a, cached)
        if has_crit:
            env, cwd = crit_env(work, cached)
            cases["crit_ps_mems"] = lambda: crit(a, env, cwd, "ps", "mems")
            cases["crit_ps"] = lambda: crit(a, env, cwd, "ps")
            cases["crit_mems"] = lambda: crit(a, env, cwd, "mems")
        cases["inspect_cli_nocache"] = lambda: pycriu_inspect_cli(a, uncached)
        if has_crit:
            env_nc, _ = crit_env(work, uncached)
            cases["crit_ps_mems_nocache"] = lambda: crit(a, env_nc, cwd, "ps", "mems")
        log(f"measuring ({args.repeat} runs each)")
        results = measure(cases, args.repeat, log)
        wdir_fs = _fs_type(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not has_crit:
        print(f"CRIU's crit or its module is not in {CRIU_SRC}: the inspect target is not measured", file=sys.stderr)
        results["crit_ps_mems"] = {"s": float("nan"), "min_s": float("nan"), "max_s": float("nan")}
    environment = runner.environment(pycriu.Criu())
    environment["grep"] = subprocess.run(["grep", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    environment["loadavg_end"] = os.getloadavg()
    environment["damon"] = damon()
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - t_start,
        "command": "python -m bench.images " + shlex.join(sys.argv[1:] if argv is None else argv),
        "config": {"mib": args.mib, "procs": args.procs, "rewrite_fraction": args.rewrite, "rewrite_pages": rewrite,
                   "repeat": args.repeat, "workdir": str(work), "workdir_fs": wdir_fs,
                   "needles": {"absent": ABSENT.decode(), "present": MARKER.decode(),
                               "regex": REGEX.decode()}},
        "environment": environment,
        "checkpoints": ck,
        "results": results,
    }
    doc["targets"] = targets(results, ck)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(doc)
    (args.out / "images.md").write_text(md + "\n")
    print()
    print(md)
    return 0 if all(t["met"] for t in doc["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
