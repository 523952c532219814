"""The end of a migration, on every path: run the flows' cleanups, collect the destination's
logs and figures, let custody settle the source's fate into the report, remove what is not
kept, and turn a failure into the error the caller sees (with the report attached)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import wait
from typing import TYPE_CHECKING

from ..errors import CriuError, first_error_line
from .custody import Outcome
from .errors import MigrationError, NoSpaceError
from .images import dir_usage
from .modes import NEEDS_LAZY

if TYPE_CHECKING:
    from .report import MigrationReport
    from .runstate import RunState

__all__ = ["finish", "final_error", "describe"]


def final_error(run: RunState, exc: BaseException) -> BaseException:
    report = run.report
    if not isinstance(exc, Exception):
        exc.report = report  # type: ignore[attr-defined]
        return exc
    if report.outcome == "refused":
        if isinstance(exc, CriuError):
            exc.report = report  # type: ignore[attr-defined]
            return exc
        return MigrationError(f"migration refused before anything was frozen: {report.error}", report=report)
    what = {
        "rolled-back": "the source runs again with its memory intact",
        "failed-after-resume": f"the destination had resumed; source is {report.source_state}, destination "
                               f"{report.destination_state}",
    }.get(report.outcome, f"source {report.source_state}, destination {report.destination_state}")
    message = f"migration failed ({report.outcome}: {what}): {report.error}"
    said = _destination_page_server_error(report)
    if said is not None:  # the source's CRIU only saw its connection reset: this is why
        message += f"; the destination's page server: {said}"
    cls = NoSpaceError if said is not None and "No space left on device" in said else MigrationError
    err = cls(message, report=report)
    err.__cause__ = exc
    return err


def _destination_page_server_error(report: MigrationReport) -> str | None:
    """CRIU's first error in the destination's page server logs (fetched back), if any."""
    for label, path in report.logs.items():
        if label.startswith("destination page-server"):
            line = first_error_line(path)
            if line is not None:
                return line
    return None


def finish(run: RunState, error: BaseException | None) -> KeyboardInterrupt | None:
    """End the run on every path: cleanups, the destination's logs and figures, custody's
    verdict into the report, the scratch and log directories. A Ctrl-C on the way (a user done
    waiting for the agent's logs) cuts the remote part short, never the local steps: the
    source's fate is still settled and the report completed. It is returned, for the caller to
    raise once the report is whole."""
    interrupted: KeyboardInterrupt | None = None
    for fn in reversed(run.cleanups):
        try:
            fn()
        except KeyboardInterrupt as exc:
            interrupted = exc
        except Exception:  # noqa: BLE001
            pass
    try:
        collect_remote(run, error)
    except KeyboardInterrupt as exc:
        interrupted = exc
        run.note("interrupted (KeyboardInterrupt) while collecting the destination's logs and figures: "
                 "they are incomplete")
    report = run.report
    report.source_state = run.custody.settle()
    assert run.custody.outcome is not None
    report.outcome = run.custody.outcome
    if report.outcome == "refused":
        report.rollback_plan = ""  # chosen, never needed: nothing was frozen
    report.destination_state = run.custody.destination_state
    report.destination_pid = run.custody.destination_pid
    report.rollback = run.custody.rollback
    report.source_pid = run.custody.source.pid
    on_disk, in_memory = (dir_usage(run.scratch, skip=run.linked_in) + run.released).split()
    logs = dir_usage(run.log_dir / "source") if run.log_dir else None
    report.disk["source"] = {**on_disk, "other": on_disk["other"] + (logs.total if logs else 0)}
    report.memory["source"] = in_memory
    if run.scratch is not None and run.custody.images_kept_for:
        run.note(f"the source's images are kept in {run.images} ({run.custody.images_kept_for})")
    elif run.scratch is not None:
        shutil.rmtree(run.scratch, ignore_errors=True)
    if run.tls_dir is not None:
        if run.authority is not None:
            wait([run.authority])  # it may still be writing a key there
        shutil.rmtree(run.tls_dir, ignore_errors=True)
    if run.src_logs is not None:
        for p in sorted(run.src_logs.glob("*.log")):
            report.logs.setdefault(f"source {p.stem}", str(p))
    agent_log = run.log_dir / "agent.log" if run.log_dir else None
    if agent_log is not None and agent_log.exists() and agent_log.stat().st_size:
        report.logs["agent stderr"] = str(agent_log)
    drop_logs(run)
    report.total_seconds = round(time.monotonic() - run.t0, 6)
    return interrupted


def drop_logs(run: RunState) -> None:
    """Remove this run's log directory unless it is to be kept (:class:`Migration` ``keep_logs``)."""
    keep = run.m.keep_logs
    if keep is None:
        keep = run.m.log_dir is not None or run.report.outcome not in (Outcome.MIGRATED, Outcome.CHECKED)
    if keep or run.log_dir is None:
        return
    shutil.rmtree(run.log_dir, ignore_errors=True)
    run.report.logs = {}
    run.report.log_dir = None
    run.note("the migration succeeded: its CRIU logs were removed (pass log_dir= or keep_logs=True, "
              "pycriu migrate --log-dir, to keep them)")


def collect_remote(run: RunState, error: BaseException | None) -> None:
    """Fetch the destination's logs and disk figures, say goodbye, close the connection."""
    conn, client = run.conn, run.client
    if conn is None:
        return
    dest_logs = run.log_dir / "destination" if run.log_dir else None
    fetched = False
    try:
        if client is not None and not conn.channel.closed and client.info:
            if dest_logs is not None:
                for p in client.fetch_logs(dest_logs):
                    run.report.logs[f"destination {p.stem}"] = str(p)
                fetched = True
            bye = client.bye()
            stats = conn.channel.stats
            run.report.bytes = {"control": stats.control, "images": stats.data_sent,
                                 "page_server": run.page_bytes, "logs_fetched": stats.data_received}
            for key, figures in (("disk", run.report.disk), ("memory", run.report.memory)):
                got = bye.get(key) or {}
                figures["destination"] = {k: int(got.get(k, 0)) for k in ("page_images", "other_images", "other")}
    except (MigrationError, OSError) as exc:
        run.note(f"could not collect the destination's logs and figures: {describe(exc)}")
        stats = conn.channel.stats
        run.report.bytes = {"control": stats.control, "images": stats.data_sent, "page_server": run.page_bytes}
    finally:
        if not fetched and conn.root is not None and dest_logs is not None:
            # local agent: its directory is ours to read
            for p in conn.root.glob("*/work/*.log"):
                dest_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, dest_logs / p.name)
                run.report.logs[f"destination {p.stem}"] = str(dest_logs / p.name)
        try:
            conn.close(timeout=max(30.0, run.m.lazy_timeout if run.report.mode in NEEDS_LAZY else 30.0))
        except Exception:  # noqa: BLE001
            pass


def describe(exc: BaseException) -> str:
    if isinstance(exc, CriuError):
        text = exc.message
        if exc.criu_message:
            text += f" (criu: {exc.criu_message})"
        return text
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    return f"{type(exc).__name__}: {exc}"
