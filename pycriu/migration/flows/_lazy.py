"""What the lazy flows share: the lazy dump in a thread, the abort before the destination took
over, and the end of the page transfer after the commit, where custody decides between killing
the source (every page arrived), resuming it (the destination failed after it resumed) and
leaving it stopped (the agent was lost)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from ..._threads import interrupts_held
from ...results import DumpResult
from .. import procs
from ..errors import MigrationError
from ..pageprogress import PageProgress
from ..uncork import Uncork
from .base import FlowContext

__all__ = ["Dumper", "ended", "dump_failed", "wait_posted", "abort_lazy", "finish_lazy", "finish_lazy_uncorked",
           "after_lazy_commit"]

#: A lazy dump in a thread (:func:`pycriu._threads.spawn`): it returns only when every page was served.
Dumper = Future[DumpResult]


def ended(dumper: Dumper, timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` seconds for the dump to end; whether it has."""
    wait([dumper], timeout)
    return dumper.done()


def dump_failed(dumper: Dumper) -> bool:
    return dumper.done() and dumper.exception() is not None


def wait_posted(posted: threading.Event, dumper: Dumper) -> None:
    """Wait until post-dump answered (or the dump failed before, resuming the source)."""
    while not posted.wait(0.02):
        if dumper.done():
            break
    if not posted.is_set():
        dumper.result()  # raises what the dump raised
        raise MigrationError("the dump ended without reaching post-dump")


def abort_lazy(run: FlowContext, dumper: Dumper, port: int, reason: str) -> None:
    """Before the destination took over: stop the agent's side, make CRIU's page server give up
    if nobody connected, and wait for the dump to end (the source is then resumed)."""
    assert run.client is not None
    run.custody.abort_destination(reason)  # its lazy-pages daemon then lets go of CRIU's page server
    if not dumper.done() and not procs.has_connection(port):
        procs.poison_lazy_server(run.source_address, port)
    if not ended(dumper, 60):
        run.note("CRIU's lazy dump did not end within 60 s of the abort: the source may stay frozen "
                 f"(pid {run.pid}); its log: {run.src_logs}/dump.log")


def finish_lazy(run: FlowContext, wait_source: Callable[[float], bool], source_failed: Callable[[], bool], *,
                port: int | None = None, total: int | None = None) -> None:
    """After the commit of a lazy flow: wait until every page is in, then kill the stopped source
    (success) or resume it (the destination failed and was killed by the agent). The bytes
    served on CRIU's page server ``port`` (of ``total`` lazy bytes) are the phase's progress."""
    assert run.client is not None
    done: dict[str, Any] | None = None
    link_error: BaseException | None = None
    run.phase_start("lazy page completion")
    # the destination runs on pages only the source has: every Ctrl-C waits for the transfer
    with interrupts_held() as interrupted, PageProgress(run.emit, "lazy page completion",
                                                        enabled=run.progress_wanted and port is not None,
                                                        local_port=port, total=total):
        try:
            done = run.client.lazy_wait(run.lazy_timeout)
        except MigrationError as exc:
            link_error = exc
        finished = wait_source(run.lazy_timeout)
    run.phase_end("lazy page completion")
    if interrupted:
        run.note("interrupted during the lazy page transfer: waited for it to finish before stopping")
    if done is not None and done.get("uncork"):
        run.note(f"destination: {done['uncork']}: the end of the lazy transfer may have waited 200 ms for "
                 "CRIU's corked socket")
    if done is not None and done["ok"]:
        run.custody.hand_over()  # left stopped by CRIU (or resumed if CRIU failed late): one copy only
        if interrupted:
            raise KeyboardInterrupt
        return
    if done is not None:  # the destination failed after resuming; the agent killed it
        run.custody.destination_failed(killed=bool(done["killed"]))
        raise MigrationError(f"lazy page transfer failed after the destination resumed: {done['error']}; "
                             f"the destination's copy was killed and the source resumed from the checkpoint "
                             "(whatever the destination did since the freeze is lost)")
    # The agent cannot be asked: decide from what the source knows.
    failed = finished and source_failed()
    run.custody.destination_lost(source_done=finished, source_failed=failed)
    ended_by_dump = run.custody.ended_by_dump  # one host: the source is in its images, its pid maybe reused
    if not finished:
        raise MigrationError(f"lost the agent ({link_error}) and CRIU is still serving pages until the transfer "
                             "ends: " + ("from the source's images, which are kept (the dump ended the source)"
                                         if ended_by_dump else f"the source stays frozen (pid {run.pid})"))
    if failed:
        # CRIU saw the page connection fail: the destination's daemon is gone, so the agent killed the
        # restored tree; CRIU itself resumed the source (or it was stopped: custody resumed it).
        raise MigrationError(f"lost the agent ({link_error}) and the page transfer failed: the source was resumed")
    if ended_by_dump:
        raise MigrationError(f"lost the agent ({link_error}) after CRIU served every page it was asked for: the "
                             "source was ended by its dump and its images are kept; check the destination's "
                             f"pid {run.custody.destination_pid}: if it does not run, restore the source from "
                             "the images (`criu restore`)")
    raise MigrationError(f"lost the agent ({link_error}) after CRIU served every page it was asked for: the "
                         f"source is left STOPPED (pid {run.pid}) so that exactly one copy can run; check the "
                         "destination, then `kill -KILL` or `kill -CONT` the source tree")


def finish_lazy_uncorked(run: FlowContext, port: int, wait_source: Callable[[float], bool],
                          source_failed: Callable[[], bool], *, total: int | None = None) -> None:
    """:func:`finish_lazy`, with CRIU's page server on ``port`` uncorked: CRIU 4.2 answers the
    lazy-pages daemon's last command from a corked socket, 200 ms late. (Only now: the
    destination has resumed, so the watcher no longer competes with CRIU inside the downtime.)"""
    with Uncork(port, serving=True) as uncork:
        finish_lazy(run, wait_source, source_failed, port=port, total=total)
    if not uncork.done:
        run.note(f"{uncork.note}: the end of the lazy transfer may have waited 200 ms for CRIU's corked socket")


def after_lazy_commit(run: FlowContext, wait_source: Callable[[float], bool],
                       source_failed: Callable[[], bool]) -> None:
    """A lazy flow failed once the commit was sent: if it was acknowledged, the destination owns
    the process: finish the page transfer (which kills the source) before the failure goes on;
    otherwise let CRIU serve whoever asks until the transfer ends, the source staying stopped."""
    if run.custody.committed:
        finish_lazy(run, wait_source, source_failed)
    elif not wait_source(run.lazy_timeout):
        run.note("CRIU was still serving pages when the migration gave up")
