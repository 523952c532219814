"""The handover: the agent restores the tree (stopped), the source commits, and custody moves
to the destination; the downtime is measured on the source's clock from the freeze to the
restored tree's resume. Written against :class:`~.runstate.RunState`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..options import PageServerAddress
from .report import Phase
from .runstate import RunState

__all__ = ["restore_and_commit"]


def restore_and_commit(run: RunState, *, lazy: bool, page_server: PageServerAddress | None,
                       name: str = "images") -> None:
    """Ask the agent to restore; on success commit (from here the destination owns the
    process)."""
    assert run.client is not None
    with run.phase("restore"):
        reply = run.client.restore(name, lazy=lazy, page_server=page_server, flags=run.m.flags,
                                    tls=bool(page_server is not None and run.criu_tls_options()))
    t_reply = time.monotonic()
    _destination_phases(run, reply, t_reply)
    run.custody.restored(reply["pid"])  # held stopped: the agent resumes it at the commit
    if reply["stats"] is not None:
        run.report.criu_stats["restore"] = reply["stats"]
    if reply["page_server_wait"]:
        run.note(f"the destination waited {reply['page_server_wait'] * 1000:.0f} ms for its page server "
                  "to finish writing before restoring")
    if reply["lazy_daemon_seconds"] is not None:
        run.note(f"starting the lazy-pages daemon took {reply['lazy_daemon_seconds'] * 1000:.0f} ms of the "
                  "restore phase")
    run.custody.commit_sending()
    try:
        ack = run.client.commit()
    finally:  # what the channel knows, also when the call raised (Ctrl-C right after the ack)
        if run.client.committed:
            run.custody.commit_acknowledged()
            if lazy:
                run.custody.serving()  # the destination runs; this frozen source serves its pages
        elif not run.client.commit_sent:  # no whole frame left, or the agent refused it
            run.custody.commit_not_delivered()
    t_ack = time.monotonic()
    if ack.get("resumed_ago") is not None:
        run.t_resume = t_ack - float(ack["resumed_ago"]) - run.client.rtt / 2
        how = ("source pre-dump notification (freeze) to the agent's SIGCONT of the restored tree at the "
               "commit, on the source's clock: the agent's delay after the SIGCONT and half the round trip "
               f"({run.client.rtt * 1000:.2f} ms) are subtracted from the arrival of its commit acknowledgement")
    else:  # an agent that resumes at the restore
        run.t_resume = t_reply - float(reply["resumed_ago"]) - run.client.rtt / 2
        how = ("source pre-dump notification (freeze) to destination post-resume notification, on the source's "
               f"clock: the agent's delay after the resume and half the round trip ({run.client.rtt * 1000:.2f} "
               "ms) are subtracted from the arrival of its reply")
    if run.t_freeze is not None:
        run.report.downtime = round(max(0.0, run.t_resume - run.t_freeze), 6)
        run.report.downtime_method = how
        run.report.marks.update(freeze=round(run.t_freeze - run.t0, 6), resume=round(run.t_resume - run.t0, 6))

def _destination_phases(run: RunState, reply: Mapping[str, Any], t_reply: float) -> None:
    """The agent's own steps of the restore, placed on this clock: its reply left when CRIU's
    restore returned, half a round trip before it arrived here."""
    assert run.client is not None
    end = t_reply - run.client.rtt / 2 - run.t0
    steps = [("criu restore", float(reply["restore_seconds"]))]
    marks = reply.get("criu_marks") or {}
    # where the restore's time went: before CRIU's first notification (the worker's start of the
    # request), between them (CRIU's own work), and after the last (the result read, the reply)
    detail = ", ".join(f"{action} +{float(t) * 1000:.1f} ms" for action, t in
                       sorted(marks.items(), key=lambda kv: float(kv[1])) if isinstance(t, (int, float)))
    if reply["lazy_daemon_seconds"] is not None:
        steps.append(("lazy-pages daemon start", float(reply["lazy_daemon_seconds"])))
    if reply["page_server_wait"]:
        steps.append(("page server finishing", float(reply["page_server_wait"])))
    for name, seconds in steps:  # each ended where the next (later) one began
        start = end - seconds
        note = f"CRIU's notifications: {detail}" if name == "criu restore" and detail else ""
        run.report.phases.append(Phase(name, round(seconds, 6), note, start=round(start, 6), host="destination"))
        end = start
