"""Run the benchmark: every (link, size, rate, mode), pycriu and baseline alternating, repeated.

One trial = a fresh heartbeat workload, one migration by one implementation, then the heartbeat
ring read back for the downtime and the return to full speed, the link's byte counter, the bytes
on disk of each side, CRIU's own statistics, and a verification of every page of the migrated
workload. Trials run one at a time; the implementations alternate (A B A B ...) so that drift in
the machine's load hits both alike.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycriu

from . import flows, heartbeat, reference
from .flows import FlowResult, TrialContext
from .netns import Link

RATES = {"idle": 0.0, "busy": 0.10}
PR_SET_CHILD_SUBREAPER = 36

#: Set by the harness's SIGINT/SIGTERM handler. The KeyboardInterrupt it raises may land inside
#: code that finishes what it started first (pycriu defers signals while CRIU works, and lets a
#: lazy transfer complete); the runner also checks this flag between trials, so a Ctrl-C always
#: stops the run after at most the current trial, and the cleanup runs.
STOP = threading.Event()


def install_stop_handlers() -> None:
    def handler(signum: int, frame: object) -> None:
        STOP.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@dataclass(frozen=True)
class Config:
    sizes: list[int]
    rates: list[str]
    links: list[str]
    modes: list[str]
    repeat: int
    impls: list[str]
    workdir: Path
    verbosity: int = 3
    ref_mib: int = 256
    verify: bool = True
    keep: bool = False
    busy_rate: float = RATES["busy"]
    settle: float = 0.0
    log: Callable[[str], None] = print


#: the flows whose source pycriu ends at the dump on one host (same_host_rollback="auto")
STOPPED_SOURCE_DIFFERS = ("classic", "page-server", "page-server-on-source")

#: The kernel reports free memory to the hypervisor 2 s after it was freed (PAGE_REPORTING_DELAY).
PAGE_REPORTING_DELAY_S = 2.0


def free_page_reporting() -> bool:
    """Whether this machine hands freed memory back to its hypervisor (a virtio balloon with
    free page reporting, feature bit 5): memory touched again after that faults in slowly."""
    for dev in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*"):
        try:
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > 5 and features[5] == "1":
            return True
    return False


def default_settle() -> float:
    """Seconds each trial waits before it starts: past the reporting delay where memory is
    reported, so that every trial starts with the same kind of free memory (none of it freed
    moments ago by the previous trial); nothing elsewhere."""
    return PAGE_REPORTING_DELAY_S + 1.0 if free_page_reporting() else 0.0


def rate_value(name: str, busy: float) -> float:
    if name == "idle":
        return 0.0
    if name == "busy":
        return busy
    return float(name)


def become_subreaper() -> None:
    """Restored trees outlive the criu that restored them; as subreaper the harness reaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_leftover_children(keep: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """SIGKILL and reap every child of the harness still there (orphaned restored trees, daemons
    of a failed flow): after a trial nothing the trial started may survive."""
    killed: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            if c in keep:
                continue
            try:
                os.kill(c, signal.SIGKILL)
                killed.append(c)
            except ProcessLookupError:
                pass
    for c in killed:
        try:
            os.waitpid(c, 0)
        except ChildProcessError:
            pass
    # reap zombies whose parent we became
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return killed


class Runner:
    def __init__(self, cfg: Config, links: dict[str, Link]) -> None:
        self.cfg = cfg
        self.links = links
        self.criu = pycriu.Criu()
        self.features = self.criu.features()
        self.binary = heartbeat.build()
        self.records: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self._trial = 0
        self.impl_funcs: dict[str, Callable[[str, TrialContext], FlowResult]] = {"baseline": flows.baseline}
        self.agents: dict[str, Any] = {}
        if any(i.startswith("pycriu") for i in cfg.impls):
            from . import pycriu_flows

            self.impl_funcs["pycriu"] = pycriu_flows.run
            self.impl_funcs["pycriu-stopped"] = functools.partial(pycriu_flows.run,
                                                                  same_host_rollback="stopped-source")

    def agent_for(self, link: Link) -> Any:
        """pycriu across the link: one ``pycriu agent --listen`` in the destination namespace per
        run (a service of the destination host). Loopback uses ``to="local"``: no agent here."""
        if not link.dst_prefix:
            return None
        if link.name not in self.agents:
            from .pycriu_flows import TcpAgent

            self.agents[link.name] = TcpAgent(link, 26999, self.cfg.workdir, self.criu.binary)
        return self.agents[link.name]

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents.clear()

    def _keep(self) -> set[int]:
        return {a.pid for a in self.agents.values()}

    # -- references --------------------------------------------------------------------------

    def link_references(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.cfg.links:
            link = self.links[name]
            m = reference.throughput(link, self._port(), self.cfg.ref_mib)
            out[name] = {"description": link.description, "throughput_start": m}
            self.cfg.log(f"[ref] {name}: {m['bytes_per_s'] / 1e6:.0f} MB/s over {m['bytes'] / 2**20:.0f} MiB")
        return out

    def _port(self) -> int:
        self._trial += 1
        return 27000 + (self._trial * 10) % 20000

    # -- one trial ---------------------------------------------------------------------------

    def trial(self, impl: str, mode: str, link_name: str, mib: int, rate_name: str, rep: int) -> dict[str, Any]:
        link = self.links[link_name]
        rate = rate_value(rate_name, self.cfg.busy_rate)
        rec: dict[str, Any] = {"impl": impl, "mode": mode, "link": link_name, "mib": mib, "rate": rate_name,
                               "rate_per_s": rate, "repeat": rep, "ok": False, "error": None}
        base = Path(tempfile.mkdtemp(prefix=f"{impl}-{mode}-", dir=self.cfg.workdir))
        src, dst = base / "src", base / "dst"
        src.mkdir()
        dst.mkdir()
        wl: heartbeat.HeartbeatWorkload | None = None
        try:
            os.sync()  # the previous trial's images are on disk, not being written back during this one
            # On a VM with free page reporting, memory the previous trial freed moments ago is
            # fast to reuse and memory freed earlier is slow (the hypervisor took it back): the
            # trial after another would run on the first one's leftovers. Wait until both kinds
            # are alike (reported), so that no trial inherits an advantage from its place.
            time.sleep(self.cfg.settle)
            wl = heartbeat.HeartbeatWorkload(self.binary, base / "heartbeat", mib=mib, rate=rate)
            ctx = TrialContext(criu=self.criu.binary, link=link, src_dir=src, dst_dir=dst, port=self._port(),
                               pid=wl.pid, verbosity=self.cfg.verbosity,
                               agent=self.agent_for(link) if impl == "pycriu" else None)
            counter0 = link.counter()
            result = self.impl_funcs[impl](mode, ctx)
            counter1 = link.counter()
            wl.adopt(result.dest_pid)
            rec.update(self._measure(wl, result))
            rec["net_bytes"] = counter1 - counter0
            if self.cfg.verify:
                rec["verify_bad_pages"] = wl.verify(timeout=60 + mib / 10)
                if rec["verify_bad_pages"]:
                    raise RuntimeError(f"{rec['verify_bad_pages']} pages differ after the migration")
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a failed trial is a result, the run goes on
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        finally:
            if wl is not None:
                wl.close()
            kill_leftover_children(self._keep())
            if not self.cfg.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                rec["dir"] = str(base)
        return rec

    def _measure(self, wl: heartbeat.HeartbeatWorkload, r: FlowResult) -> dict[str, Any]:
        # Let the workload run on the destination long enough to see it back at full speed.
        deadline = time.monotonic() + 15
        settle_until = time.monotonic() + heartbeat.END_MARGIN_NS / 1e9 + 0.1
        while True:
            now = time.monotonic()
            if now >= settle_until:
                beats = wl.beats()
                try:
                    g = heartbeat.analyse(beats, r.start_ns, r.end_ns)
                except ValueError:
                    g = None
                if g is not None and (g.full_speed_ns < beats.t[-1] - 60_000_000 or now > deadline):
                    break
                if g is None and now > deadline:
                    raise RuntimeError("the workload's heartbeat did not resume after the migration")
            time.sleep(0.05)
        s = 1e-9
        out: dict[str, Any] = {
            "downtime_s": g.downtime_ns * s,
            "resumed_s": (g.first_after_ns - r.start_ns) * s,
            "freeze_at_s": (g.last_before_ns - r.start_ns) * s,
            "total_s": (r.end_ns - r.start_ns) * s,
            # "again": from the freeze, so that work before the freeze (agent start) does not count
            "full_speed_s": (max(g.full_speed_ns, g.first_after_ns) - g.last_before_ns) * s,
            "restored_s": (r.restored_ns - r.start_ns) * s if r.restored_ns else None,
            "lazy_done_s": (r.lazy_done_ns - g.last_before_ns) * s if r.lazy_done_ns else None,
            "nominal_interval_ms": g.nominal_interval_ns / 1e6,
            "missing_beats": g.missing_beats,
            "clock_shift_s": g.clock_shift_ns * s,
            "disk_src_bytes": r.disk.get("src_bytes"),
            "disk_dst_bytes": r.disk.get("dst_bytes"),
            "disk_src_pages_bytes": r.disk.get("src_pages_bytes"),
            "disk_dst_pages_bytes": r.disk.get("dst_pages_bytes"),
            "phases": r.phases,
        }
        if r.dump_stats is not None:
            d = r.dump_stats
            out.update(criu_freezing_s=d.freezing_time, criu_frozen_s=d.frozen_time, criu_memdump_s=d.memdump_time,
                       criu_memwrite_s=d.memwrite_time, pages_scanned=d.pages_scanned, pages_written=d.pages_written,
                       pages_lazy=d.pages_lazy)
        if r.restore_stats is not None:
            rs = r.restore_stats
            out.update(criu_restore_s=rs.restore_time, criu_forking_s=rs.forking_time,
                       pages_restored=rs.pages_restored)
        out.update(r.extra)
        if out.get("criu_dump_frozen_log_s") is not None and out.get("criu_restore_log_s") is not None:
            out["criu_own_s"] = out["criu_dump_frozen_log_s"] + out["criu_restore_log_s"]
        # How long starting `criu lazy-pages` took inside the downtime (CRIU's work, but neither
        # frozen nor restore time): the CLI's own step, or the note pycriu's report makes.
        if "lazy-pages start" in r.phases:
            out["criu_lazy_daemon_start_s"] = r.phases["lazy-pages start"]
        for note in r.extra.get("pycriu_notes") or ():
            m = re.search(r"starting the lazy-pages daemon took (\d+) ms", note)
            if m:
                out["criu_lazy_daemon_start_s"] = int(m.group(1)) / 1e3
        return out

    # -- the whole matrix --------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, int, str]]:
        cells = []
        for link in self.cfg.links:
            for mib in self.cfg.sizes:
                for rate in self.cfg.rates:
                    for mode in self.cfg.modes:
                        if mode in flows.MEM_TRACK_MODES and not self.features.mem_track:
                            continue
                        if mode in flows.LAZY_MODES and not self.features.lazy_pages:
                            continue
                        cells.append((link, mode, mib, rate))
        return cells

    def skips(self) -> list[dict[str, str]]:
        out = []
        for mode in self.cfg.modes:
            if mode in flows.MEM_TRACK_MODES and not self.features.mem_track:
                out.append({"mode": mode, "reason": "kernel has no dirty-memory tracking (CONFIG_MEM_SOFT_DIRTY "
                                                    "not set; criu feature check: mem_track=False)"})
            if mode in flows.LAZY_MODES and not self.features.lazy_pages and not any(
                    sk["mode"] == mode for sk in out):
                out.append({"mode": mode, "reason": "criu feature check: lazy_pages=False (no usable userfaultfd)"})
        return out

    def run(self) -> list[dict[str, Any]]:
        cells = self.plan()
        total = sum(len(self._impls(link, mode)) for link, mode, _, _ in cells) * self.cfg.repeat
        n = 0
        for rep in range(self.cfg.repeat):
            for link, mode, mib, rate in cells:
                # A B, then B A on the next repeat: neither always runs right after the previous
                # cell (whose page cache may still be written back)
                impls = self._impls(link, mode)
                order = impls if rep % 2 == 0 else list(reversed(impls))
                for impl in order:
                    if STOP.is_set():
                        raise KeyboardInterrupt("stopped by a signal")
                    n += 1
                    rec = self.trial(impl, mode, link, mib, rate, rep)
                    self.records.append(rec)
                    self.cfg.log(_line(n, total, rec))
                    if STOP.is_set():
                        rec["interrupted"] = True
                        self.cfg.log(f"  (a stop signal arrived during this trial and did not end it: {impl} "
                                     f"{'finished the migration' if rec['ok'] else 'failed: ' + str(rec['error'])})")
        return self.records


    def _impls(self, link: str, mode: str) -> list[str]:
        """The implementations a cell runs: pycriu-stopped only where its option changes something:
        on one host (``lo``), in the flows that otherwise end the source at the dump."""
        return [i for i in self.cfg.impls
                if i != "pycriu-stopped" or (link == "lo" and mode in STOPPED_SOURCE_DIFFERS)]


def _line(n: int, total: int, rec: dict[str, Any]) -> str:
    head = f"[{n}/{total}] {rec['link']:5} {rec['mib']:5} MiB {rec['rate']:4} {rec['mode']:21} {rec['impl']:8}"
    if not rec["ok"]:
        return f"{head} FAILED: {rec['error']}"
    lazy = f" lazy-done {rec['lazy_done_s']:.3f} s" if rec.get("lazy_done_s") else ""
    return (f"{head} downtime {rec['downtime_s'] * 1e3:8.1f} ms  total {rec['total_s']:7.3f} s  "
            f"full-speed {rec['full_speed_s']:.3f} s{lazy}  net {rec['net_bytes'] / 1e6:.1f} MB")


def sysctl_pipe_max() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except OSError:
        return 0


def environment(criu: pycriu.Criu) -> dict[str, Any]:
    import platform
    import subprocess

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    f = criu.features()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "criu_binary": criu.binary,
        "criu_version": str(criu.version()),
        "pycriu_version": pycriu.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", ".")),
        "features": {"mem_track": f.mem_track, "lazy_pages": f.lazy_pages, "pidfd_store": f.pidfd_store},
        "pipe_max_size": sysctl_pipe_max(),
        "loadavg_start": os.getloadavg(),
    }
