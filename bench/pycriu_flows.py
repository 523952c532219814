"""The same flows through pycriu: ``Migration(pid, to=..., mode=...).run()``.

On ``lo`` the destination is ``to="local"``: pycriu starts its local agent subprocess itself,
inside ``run()`` (so its start-up counts in the total time, before the freeze). Across the link
the destination is a ``pycriu agent --listen`` started once per run in the destination namespace
with a shared secret, like a service the destination host runs; each trial is one session.

What the harness takes from pycriu's report: the restored pid, CRIU's statistics, the disk
figures (what each side wrote, measured before pycriu removes its directories), the phases, the
CRIU logs and the ``freeze+dump`` phase (for CRIU's own time), and pycriu's own downtime estimate
(``reported_downtime_s``, for comparison only: the downtime in the table is the heartbeat's).
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pycriu.daemons import stop_process
from pycriu.results import DumpStats, RestoreStats

from .flows import FlowResult, TrialContext, criu_log_times
from .netns import Link
from .procs import FlowError


class TcpAgent:
    """``python -m pycriu.migration.agent --listen DST:PORT`` in the destination namespace."""

    def __init__(self, link: Link, port: int, workdir: Path, criu_binary: str) -> None:
        self.link = link
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="agent-root-", dir=workdir))
        self.secret = secrets.token_hex(32)
        secret_file = workdir / "agent-secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.secret + "\n")
        self.stderr_path = workdir / "agent.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        argv = link.dst([sys.executable, "-m", "pycriu.migration.agent", "--listen", f"{link.dst_addr}:{port}",
                         "--secret-file", str(secret_file), "--root", str(self.root), "--criu", criu_binary])
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                                     start_new_session=True, cwd="/")
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode(errors="replace") if ready else ""
        if "listening" not in line:
            self.close()
            raise FlowError(f"pycriu agent in the destination namespace did not start: {line.strip()!r} "
                            f"(see {self.stderr_path})")
        self.url = f"tcp://{link.dst_addr}:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        stop_process(self.proc, grace=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def run(mode: str, ctx: TrialContext, same_host_rollback: str = "auto") -> FlowResult:
    """Migrate ``ctx.pid`` with pycriu in ``mode``; return what the harness measures.
    ``same_host_rollback``: on ``lo``, :class:`~pycriu.Migration`'s option of that name."""
    from pycriu.migration import Migration, MigrationError

    marks: dict[str, int] = {}

    def progress(p: Any) -> None:
        if p.event == "end":
            marks[p.phase] = time.time_ns()

    # pycriu's own choice of where the source's images go (tmpfs for the lazy flows' few non-lazy
    # pages): keeping off a disk what needs no disk is part of what is measured
    kw: dict[str, Any] = {"mode": mode, "log_dir": ctx.src_dir / "logs", "progress": progress}
    agent: TcpAgent | None = ctx.agent
    if agent is not None:
        # CRIU's page connections in the clear, as in the CLI baseline (pycriu encrypts them by
        # default over tcp://; like for like, the comparison leaves that out)
        kw.update(to=agent.url, secret=agent.secret, criu_tls=False)
    else:
        kw.update(to="local", same_host_rollback=same_host_rollback)
    migration = Migration(ctx.pid, **kw)
    t0 = time.time_ns()
    try:
        report = migration.run()
    except MigrationError as exc:
        r = getattr(exc, "report", None)
        raise FlowError(f"pycriu migration failed: {exc}" + (f" [outcome {r.outcome}]" if r else "")) from exc
    t1 = time.time_ns()
    if report.destination_pid is None:
        raise FlowError(f"pycriu reported no destination pid (outcome {report.outcome})")

    dump = report.criu_stats.get("dump")
    restore = report.criu_stats.get("restore")
    dump_stats = DumpStats(**dump) if isinstance(dump, dict) else None
    restore_stats = RestoreStats(**restore) if isinstance(restore, dict) else None
    src = report.disk.get("source", {})
    dst = report.disk.get("destination", {})
    disk = {"src_bytes": src.get("page_images", 0) + src.get("other_images", 0),
            "dst_bytes": dst.get("page_images", 0) + dst.get("other_images", 0),
            "src_pages_bytes": src.get("page_images", 0), "dst_pages_bytes": dst.get("page_images", 0)}
    extra: dict[str, Any] = {"reported_downtime_s": report.downtime, "reported_total_s": report.total_seconds,
                             "pycriu_bytes": dict(report.bytes), "pycriu_pages": dict(report.pages),
                             "pycriu_notes": list(report.notes)}
    logs = {k: Path(v) for k, v in report.logs.items()}
    # CRIU's own time, as for the CLI: the dump log from the freeze to post-dump, then the restore
    # log. CRIU waits in post-dump while pycriu sends the images (and, but in the lazy flows,
    # restores), so "Unfreezing tasks" comes after all that, and no -v3 line marks post-dump:
    # pycriu's freeze+dump phase (pre-dump to post-dump notification) places it in the log.
    freeze_dump = [ph.seconds for ph in report.phases if ph.name == "freeze+dump"]
    dump_log = logs.get("source dump")
    if not freeze_dump:
        dump_log = None  # without pycriu's post-dump time, "Unfreezing tasks" would count the wait
    extra.update(criu_log_times(dump_log, logs.get("destination restore"),
                                post_dump_after_s=freeze_dump[-1] if freeze_dump else None))
    phases: dict[str, float] = {}
    for p in report.phases:
        phases[p.name] = phases.get(p.name, 0.0) + p.seconds
    return FlowResult(dest_pid=report.destination_pid, start_ns=t0, end_ns=t1, restored_ns=marks.get("restore"),
                      lazy_done_ns=marks.get("lazy page completion"), dump_stats=dump_stats,
                      restore_stats=restore_stats, disk=disk, phases=phases, extra=extra)
