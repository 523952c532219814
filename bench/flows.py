"""The flows under test: each mode done by pycriu (``Migration``) and by hand with the ``criu`` CLI.

A flow gets a :class:`TrialContext` (the workload's pid, the link, a source-side and a
destination-side directory, free ports) and returns a :class:`FlowResult`: the restored pid, the
harness's own timestamps, CRIU's statistics and the bytes each side wrote to disk. Downtime is
not reported by flows: the harness reads it from the workload's heartbeat.

Baseline: the flows as CRIU's documentation describes them (criu.org "Live migration",
"Disk-less migration", "Lazy migration", "Iterative migration"), one ``criu`` command per step,
daemons started with ``--status-fd`` and waited for, and a shell-level copy of the images:
``cp -a SRC/. DST/`` on loopback; across the link, ``tar -c -C SRC . >/dev/tcp/DST/PORT`` (bash)
into a receiver started on the destination before the dump (``_tcp.py recv | tar -x -C DST``),
which is what ``tar | nc`` does. Every step a hand-written script would do before the freeze
(starting the page server, starting the copy receiver) is done before the freeze here too.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycriu.results import DumpStats, RestoreStats, read_stats

from .netns import Link
from .procs import Daemon, FlowError, run
from .reference import receiver_argv

MODES = ("classic", "page-server", "lazy", "page-server-on-source", "pre-copy", "hybrid")
MEM_TRACK_MODES = ("pre-copy", "hybrid")
LAZY_MODES = ("lazy", "page-server-on-source", "hybrid")


@dataclass
class TrialContext:
    criu: str                 # the criu binary (the one pycriu uses)
    link: Link
    src_dir: Path             # source side's working directory (exists, empty)
    dst_dir: Path             # destination side's working directory (exists, empty)
    port: int                 # ports port .. port+9 are free for this trial
    pid: int                  # root of the tree to migrate
    verbosity: int = 3        # CRIU log level for the CLI flows (-vN); pycriu logs at INFO (3)
    agent: Any = None         # pycriu flows: where the destination agent is (see pycriu_flows)


@dataclass
class FlowResult:
    dest_pid: int
    start_ns: int                       # when the flow started (CLOCK_REALTIME ns, time.time_ns())
    end_ns: int                         # when everything was finished (lazy pages included)
    restored_ns: int | None = None      # when the restore returned
    lazy_done_ns: int | None = None     # lazy modes: when the last page was in place
    dump_stats: DumpStats | None = None
    restore_stats: RestoreStats | None = None
    disk: dict[str, int] = field(default_factory=dict)   # src_bytes, dst_bytes, src_pages_bytes, dst_pages_bytes
    phases: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def disk_usage(directory: Path) -> tuple[int, int]:
    """(bytes of every CRIU image file, bytes of page images) under ``directory`` (logs excluded)."""
    total = pages = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.endswith(".log") or name.endswith(".pid") or name.endswith(".socket"):
                continue
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            size = os.stat(path).st_size
            total += size
            if name.startswith("pages-"):
                pages += size
    return total, pages


_STAMP = re.compile(r"^\((\d+\.\d+)\) ?(.*)")

# Where a dump log places CRIU's notifications (cr_dump_tasks() and cr_dump_finish(), CRIU 4.2.1).
# "Running pre-dump scripts" and "Running post-dump scripts" are debug lines (-v4 only) and an RPC
# notification logs nothing, so at -v3 each is placed by its neighbours: pre-dump is sent right
# after the "Dumping processes" banner (microseconds later), and post-dump is answered right before
# CRIU logs "Starting lazy pages server" (a lazy dump) or "Unfreezing tasks" (any other).
_PRE_DUMP = "Dumping processes (pid:"
_POST_DUMP = "Running post-dump scripts"
_POST_DUMP_ANSWERED = ("Starting lazy pages server", "Unfreezing tasks")
_FREEZE = "Seized task"
#: How far pycriu's clock may put post-dump outside the log lines around it before the figure is refused.
_CLOCK_SLACK_S = 0.002


def _timed_lines(log: Path) -> list[tuple[float, str]]:
    """The timestamped lines of a CRIU log: (seconds since that CRIU started, text); [] if unreadable."""
    lines: list[tuple[float, str]] = []
    try:
        with open(log, errors="replace") as f:
            for line in f:
                m = _STAMP.match(line)
                if m:
                    lines.append((float(m.group(1)), m.group(2)))
    except OSError:
        pass
    return lines


def _first(lines: list[tuple[float, str]], *markers: str) -> int | None:
    """Index of the first line containing any of ``markers``."""
    return next((i for i, (_, text) in enumerate(lines) if any(m in text for m in markers)), None)


def dump_frozen(lines: list[tuple[float, str]], post_dump_after_s: float | None = None) -> dict[str, float | str]:
    """CRIU's own work in a dump while the tree is frozen, from the dump log's ``lines``.

    From the freeze (the first "Seized task") to the moment CRIU sent its post-dump notification,
    leaving out the time it then waited for the answer: pycriu's classic, page-server and
    page-server-on-source flows move the images and restore on the destination inside post-dump,
    so "Unfreezing tasks" comes only after all that. Where post-dump is:

    * ``post_dump_after_s`` None (the CLI: no action script, post-dump returns at once): at -v4 the
      "Running post-dump scripts" line, else the first line after its answer ("Starting lazy pages
      server" or "Unfreezing tasks", a few microseconds later);
    * ``post_dump_after_s`` given (pycriu: seconds from its pre-dump to its post-dump
      notification, on pycriu's clock): that long after pre-dump's place in the log. It must fall
      between the last line logged before the answer and the first after it (the two clocks
      agree), else the figure is refused and ``criu_log_error`` says why.

    Returns ``criu_dump_frozen_log_s`` and, with ``post_dump_after_s``, ``criu_post_dump_wait_s``
    (how long CRIU waited for its post-dump answer), or ``criu_log_error``. For instance:

    >>> log = [(0.010, "Dumping processes (pid: 7 comm: w)"), (0.011, "Seized task 7, state 1"),
    ...        (0.030, "Writing image inventory (version 1)"), (0.130, "Unfreezing tasks into 3")]
    >>> dump_frozen(log)  # the CLI: nothing waits in post-dump
    {'criu_dump_frozen_log_s': 0.119}
    >>> dump_frozen(log, 0.0205)  # pycriu: post-dump 20.5 ms after pre-dump, then 99.5 ms of waiting
    {'criu_dump_frozen_log_s': 0.0195, 'criu_post_dump_wait_s': 0.0995}
    >>> sorted(dump_frozen(log, 0.15))  # a "post-dump" after CRIU went on: the clocks disagree
    ['criu_log_error']
    """
    freeze = _first(lines, _FREEZE)
    answered = _first(lines, *_POST_DUMP_ANSWERED)
    if freeze is None or answered is None or answered <= freeze:
        return {}
    t_freeze, t_answered = lines[freeze][0], lines[answered][0]
    if post_dump_after_s is None:
        sent = _first(lines, _POST_DUMP)
        t_post = lines[sent][0] if sent is not None and sent < answered else t_answered
        return {"criu_dump_frozen_log_s": round(t_post - t_freeze, 6)}
    pre = _first(lines, _PRE_DUMP)
    if pre is None or pre > freeze:
        return {"criu_log_error": "no pre-dump point before the freeze in the dump log"}
    t_post = lines[pre][0] + post_dump_after_s
    t_before = lines[answered - 1][0]  # the last line CRIU logged before it sent post-dump
    if t_post > t_answered + _CLOCK_SLACK_S:
        return {"criu_log_error": f"post-dump {(t_post - t_answered) * 1e3:.1f} ms after CRIU's "
                                  f"{lines[answered][1][:26]!r}: pycriu's freeze+dump phase does not end at post-dump"}
    if t_post < t_before - _CLOCK_SLACK_S:
        return {"criu_log_error": f"post-dump {(t_before - t_post) * 1e3:.1f} ms before CRIU's last line before it "
                                  f"({lines[answered - 1][1][:40]!r})"}
    t_post = min(max(t_post, t_before), t_answered)
    return {"criu_dump_frozen_log_s": round(t_post - t_freeze, 6),
            "criu_post_dump_wait_s": round(t_answered - t_post, 6)}


def criu_log_times(dump_log: Path | None, restore_log: Path | None,
                   post_dump_after_s: float | None = None) -> dict[str, float | str]:
    """CRIU's own time inside the downtime, from the timestamps of its logs (``-v3`` and up); the
    same definition for pycriu and the CLI.

    ``criu_dump_frozen_log_s``: the dump from the freeze to its post-dump notification, without
    any wait for the answer (see :func:`dump_frozen`; ``post_dump_after_s`` is pycriu's
    pre-dump-to-post-dump time). CRIU's ``stats-dump`` cannot serve here: its frozen time runs
    until the tasks are unfrozen (post-dump answer included), and a lazy dump's is garbage in CRIU
    4.2.1 (frozen time, zero page counts).
    ``criu_restore_log_s``: the whole ``criu restore`` up to "Restore finished" (its start-up,
    30 to 45 ms here, is CRIU's own work too and not in ``stats-restore``).
    """
    out: dict[str, float | str] = {}
    if dump_log is not None:
        out.update(dump_frozen(_timed_lines(dump_log), post_dump_after_s))
    if restore_log is not None:
        restore = _timed_lines(restore_log)
        done = _first(restore, "Restore finished successfully")
        if done is not None:
            out["criu_restore_log_s"] = restore[done][0]
    return out


def _disk(ctx: TrialContext) -> dict[str, int]:
    src, src_pages = disk_usage(ctx.src_dir)
    dst, dst_pages = disk_usage(ctx.dst_dir)
    return {"src_bytes": src, "dst_bytes": dst, "src_pages_bytes": src_pages, "dst_pages_bytes": dst_pages}


# --- the criu CLI, step by step -------------------------------------------------------------------


class _Cli:
    """One hand-scripted migration: the commands of CRIU's documentation, in order."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx
        self.link = ctx.link
        self.daemons: list[Daemon] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.phases: dict[str, float] = {}
        self._t = time.time_ns()

    def phase(self, name: str) -> None:
        now = time.time_ns()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._t) / 1e9
        self._t = now

    def criu(self, action: str, images: Path, *args: str, dst: bool = False, log: str | None = None) -> list[str]:
        log = log or f"{action}.log"
        argv = [self.ctx.criu, action, "-D", str(images), "-o", log, f"-v{self.ctx.verbosity}", *args]
        return self.link.dst(argv) if dst else argv

    def run(self, argv: list[str], step: str, log: Path) -> None:
        run(argv, step=f"baseline {step}", log=log)

    def start(self, argv: list[str], step: str, log: Path | None, **kw: Any) -> Daemon:
        d = Daemon(argv, step=f"baseline {step}", log=log, **kw)
        self.daemons.append(d)
        return d

    # -- the image copy ------------------------------------------------------------------------

    def copier(self, port: int) -> Callable[[Path, tuple[str, ...]], None]:
        """Arm the shell-level copy into ``dst_dir`` now (before the freeze); return ``copy(src, exclude)``.

        Loopback: ``cp -a``. Across the link: the receiver (``_tcp.py recv | tar -x``) starts
        now on the destination, and ``copy`` runs ``tar -c ... > /dev/tcp/DST/PORT`` in bash.
        """
        dst = self.ctx.dst_dir
        if not self.link.dst_prefix:
            def cp(src: Path, exclude: tuple[str, ...]) -> None:
                names = [n for n in os.listdir(src) if not any(fnmatch.fnmatch(n, e) for e in exclude)]
                if names:
                    run(["cp", "-a", "-t", str(dst), *[str(src / n) for n in names]], step="baseline cp -a")
            return cp

        rx = Daemon(receiver_argv(self.link, port), step="baseline copy receiver",
                    status_flag="--ready-fd", stdout=subprocess.PIPE)
        self.daemons.append(rx)
        assert rx.proc.stdout is not None
        tar = subprocess.Popen(self.link.dst(["tar", "-x", "-C", str(dst)]), stdin=rx.proc.stdout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        rx.proc.stdout.close()
        self.popens.append(tar)

        def send(src: Path, exclude: tuple[str, ...]) -> None:
            excl = "".join(f" --exclude='{e}'" for e in exclude)
            run(["bash", "-c", f"tar -c -C '{src}'{excl} . > /dev/tcp/{self.link.dst_addr}/{port}"],
                step="baseline tar > /dev/tcp")
            rx.wait(120)
            _, err = tar.communicate(timeout=120)
            if tar.returncode != 0:
                raise FlowError(f"baseline tar -x failed: {err.decode(errors='replace').strip()}")
        return send

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _read_pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def baseline(mode: str, ctx: TrialContext) -> FlowResult:
    """Run ``mode`` with the criu CLI as documented; return what happened."""
    cli = _Cli(ctx)
    try:
        result = _BASELINES[mode](cli, ctx)
    finally:
        cli.close()
    final = "final" if mode in MEM_TRACK_MODES else ""
    result.extra.update(criu_log_times(ctx.src_dir / final / "dump.log", ctx.dst_dir / final / "restore.log"))
    return result


def _restore(cli: _Cli, ctx: TrialContext, images: Path, *extra: str) -> int:
    pidfile = ctx.dst_dir / "restore.pid"
    cli.run(cli.criu("restore", images, "-d", "--pidfile", str(pidfile), *extra, dst=True),
            "criu restore", images / "restore.log")
    return _read_pid(pidfile)


def _stats(src: Path, dst: Path) -> tuple[DumpStats | None, RestoreStats | None]:
    d = read_stats(src / "stats-dump")
    r = read_stats(dst / "stats-restore")
    return (d if isinstance(d, DumpStats) else None, r if isinstance(r, RestoreStats) else None)


def _classic(cli: _Cli, ctx: TrialContext) -> FlowResult:
    # criu.org/Live_migration: dump, copy the images, restore.
    t0 = time.time_ns()
    copy = cli.copier(ctx.port + 1)
    cli.phase("prepare")
    cli.run(cli.criu("dump", ctx.src_dir, "-t", str(ctx.pid)), "criu dump", ctx.src_dir / "dump.log")
    cli.phase("dump")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    pid = _restore(cli, ctx, ctx.dst_dir)
    t1 = time.time_ns()
    cli.phase("restore")
    d, r = _stats(ctx.src_dir, ctx.dst_dir)
    return FlowResult(pid, t0, t1, restored_ns=t1, dump_stats=d, restore_stats=r, disk=_disk(ctx),
                      phases=cli.phases)


def _page_server(cli: _Cli, ctx: TrialContext) -> FlowResult:
    # criu.org/Disk-less_migration: page server on the destination, dump into it, copy the
    # (small) remaining images, restore.
    t0 = time.time_ns()
    ps_port = ctx.port
    ps = cli.start(cli.criu("page-server", ctx.dst_dir, "--address", ctx.link.dst_addr, "--port", str(ps_port),
                            dst=True), "criu page-server", ctx.dst_dir / "page-server.log")
    copy = cli.copier(ctx.port + 1)
    cli.phase("prepare")
    cli.run(cli.criu("dump", ctx.src_dir, "-t", str(ctx.pid), "--page-server", "--address", ctx.link.dst_addr,
                     "--port", str(ps_port)), "criu dump", ctx.src_dir / "dump.log")
    ps.wait(60)
    cli.phase("dump")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    pid = _restore(cli, ctx, ctx.dst_dir)
    t1 = time.time_ns()
    cli.phase("restore")
    d, r = _stats(ctx.src_dir, ctx.dst_dir)
    return FlowResult(pid, t0, t1, restored_ns=t1, dump_stats=d, restore_stats=r, disk=_disk(ctx),
                      phases=cli.phases)


def _lazy(cli: _Cli, ctx: TrialContext) -> FlowResult:
    # criu.org/Lazy_migration: dump --lazy-pages (the frozen source serves its pages), copy the
    # images, lazy-pages daemon on the destination, restore --lazy-pages.
    t0 = time.time_ns()
    lazy_port = ctx.port
    copy = cli.copier(ctx.port + 1)
    cli.phase("prepare")
    dump = cli.start(cli.criu("dump", ctx.src_dir, "-t", str(ctx.pid), "--lazy-pages", "--address",
                              ctx.link.src_addr, "--port", str(lazy_port)),
                     "criu dump --lazy-pages", ctx.src_dir / "dump.log", timeout=300)
    cli.phase("dump")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    return _lazy_restore(cli, ctx, t0, lazy_port, dump)


def _lazy_restore(cli: _Cli, ctx: TrialContext, t0: int, port: int, source: Daemon) -> FlowResult:
    """The destination half of both lazy flows: ``criu lazy-pages`` reading from the source's page
    server at ``port``, ``criu restore --lazy-pages``, then wait until the daemon has every page
    and the serving ``source`` process (the lazy dump, or the lazy page server) has exited."""
    lp = cli.start(cli.criu("lazy-pages", ctx.dst_dir, "--page-server", "--address", ctx.link.src_addr,
                            "--port", str(port), dst=True), "criu lazy-pages", ctx.dst_dir / "lazy-pages.log")
    cli.phase("lazy-pages start")
    pid = _restore(cli, ctx, ctx.dst_dir, "--lazy-pages")
    t_restored = time.time_ns()
    cli.phase("restore")
    lp.wait(600)
    t_lazy = lp.exited_ns
    source.wait(600)
    t1 = time.time_ns()
    cli.phase("lazy pages")
    d, r = _stats(ctx.src_dir, ctx.dst_dir)
    return FlowResult(pid, t0, t1, restored_ns=t_restored, lazy_done_ns=t_lazy, dump_stats=d, restore_stats=r,
                      disk=_disk(ctx), phases=cli.phases)


def _page_server_on_source(cli: _Cli, ctx: TrialContext) -> FlowResult:
    # The "page server on source" flow of CRIU's memory-transfer figure (zdtm --remote-lazy-pages):
    # dump to the source's disk, serve those pages with `page-server --lazy-pages`, copy the
    # images, lazy-pages daemon + restore --lazy-pages on the destination. The copy includes
    # pages-*.img: `criu restore --lazy-pages` reads the non-lazy pages (vDSO, stack, ...) from
    # the local page image at their offsets in it ("Can't read async pr bytes" without it), and
    # a plain dump writes lazy and non-lazy pages into one file, so a shell copy cannot split them.
    t0 = time.time_ns()
    port = ctx.port
    copy = cli.copier(ctx.port + 1)
    cli.phase("prepare")
    cli.run(cli.criu("dump", ctx.src_dir, "-t", str(ctx.pid)), "criu dump", ctx.src_dir / "dump.log")
    cli.phase("dump")
    ps = cli.start(cli.criu("page-server", ctx.src_dir, "--lazy-pages", "--address", ctx.link.src_addr,
                            "--port", str(port)), "criu page-server --lazy-pages", ctx.src_dir / "page-server.log")
    cli.phase("page server start")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    return _lazy_restore(cli, ctx, t0, port, ps)


def _pre_dumps(cli: _Cli, ctx: TrialContext, count: int = 2) -> Path:
    # criu.org/Iterative_migration: pre-dump --track-mem into 1/, 2/ (each with its parent),
    # then the final dump with --prev-images-dir; returns the last pre-dump directory.
    prev: Path | None = None
    for i in range(1, count + 1):
        d = ctx.src_dir / str(i)
        d.mkdir()
        args = ["-t", str(ctx.pid), "--track-mem"]
        if prev is not None:
            args += ["--prev-images-dir", f"../{prev.name}"]
        cli.run(cli.criu("pre-dump", d, *args), f"criu pre-dump {i}", d / "pre-dump.log")
        prev = d
    assert prev is not None
    return prev


def _pre_copy(cli: _Cli, ctx: TrialContext) -> FlowResult:
    t0 = time.time_ns()
    copy = cli.copier(ctx.port + 1)
    prev = _pre_dumps(cli, ctx)
    cli.phase("pre-dumps")
    final = ctx.src_dir / "final"
    final.mkdir()
    cli.run(cli.criu("dump", final, "-t", str(ctx.pid), "--track-mem", "--prev-images-dir", f"../{prev.name}"),
            "criu dump", final / "dump.log")
    cli.phase("dump")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    pid = _restore(cli, ctx, ctx.dst_dir / "final")
    t1 = time.time_ns()
    cli.phase("restore")
    d, r = _stats(final, ctx.dst_dir / "final")
    return FlowResult(pid, t0, t1, restored_ns=t1, dump_stats=d, restore_stats=r, disk=_disk(ctx),
                      phases=cli.phases)


def _hybrid(cli: _Cli, ctx: TrialContext) -> FlowResult:
    t0 = time.time_ns()
    copy = cli.copier(ctx.port + 1)
    prev = _pre_dumps(cli, ctx)
    cli.phase("pre-dumps")
    final = ctx.src_dir / "final"
    final.mkdir()
    dump = cli.start(cli.criu("dump", final, "-t", str(ctx.pid), "--track-mem", "--prev-images-dir",
                              f"../{prev.name}", "--lazy-pages", "--address", ctx.link.src_addr,
                              "--port", str(ctx.port)), "criu dump --lazy-pages", final / "dump.log", timeout=300)
    cli.phase("dump")
    copy(ctx.src_dir, ())
    cli.phase("copy")
    dst_final = ctx.dst_dir / "final"
    lp = cli.start(cli.criu("lazy-pages", dst_final, "--page-server", "--address", ctx.link.src_addr,
                            "--port", str(ctx.port), dst=True), "criu lazy-pages", dst_final / "lazy-pages.log")
    pid = _restore(cli, ctx, dst_final, "--lazy-pages")
    t_restored = time.time_ns()
    cli.phase("restore")
    lp.wait(600)
    t_lazy = lp.exited_ns
    dump.wait(600)
    t1 = time.time_ns()
    cli.phase("lazy pages")
    d, r = _stats(final, dst_final)
    return FlowResult(pid, t0, t1, restored_ns=t_restored, lazy_done_ns=t_lazy, dump_stats=d, restore_stats=r,
                      disk=_disk(ctx), phases=cli.phases)


_BASELINES: dict[str, Callable[[_Cli, TrialContext], FlowResult]] = {
    "classic": _classic,
    "page-server": _page_server,
    "lazy": _lazy,
    "page-server-on-source": _page_server_on_source,
    "pre-copy": _pre_copy,
    "hybrid": _hybrid,
}
