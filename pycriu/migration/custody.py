"""Custody of the source tree: the one owner of the rule "exactly one copy of the process runs".

A migration moves through stages, and each stage allows exactly one answer to a failure:

==============  ====================================================  ===========================
stage           where the process is                                   a failure there
==============  ====================================================  ===========================
untouched       the source runs; nothing was ever stopped              ``refused``
pre-copied      pre-dumps freeze and resume it; the source runs         rolled back
frozen          CRIU's dump froze it                                    rolled back: CRIU resumes
                                                                        it, or custody does
dumped          images complete; kept stopped (``leave_stopped``)       rolled back: the destination
                until the destination acknowledges the commit           drops its copy, the source
                                                                        is resumed
checkpointed    (one host, the rollback being the images: rollback.py)  rolled back: the destination
                the dump ended the source; its complete images on       drops its copy, the source
                this host are the rollback                              is restored from its images
commit sent     the destination may own it; the source never resumes    ``unknown``: the source
                again (a commit the agent refused goes back to dumped)  stays stopped
committed       the destination acknowledged: it owns the process       ``migrated``: the source is
                                                                        killed
serving         (lazy flows) committed; the frozen source still serves  decided by what the
                the destination's missing pages                         destination reports
handed over     the source was killed: one copy, the destination's      ``migrated``
==============  ====================================================  ===========================

The flows and the run only *report* events (CRIU's notifications, the commit, the lazy transfer's
end) to a :class:`Custody`; it alone decides whether the source is resumed, killed or left
stopped, and what the outcome is. Both copies are reached through two small interfaces,
:class:`SourceTree` and :class:`DestinationCopy`, so that the whole table is tested without root
(``tests/test_migration_custody.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import PidInUseError
from . import images, procs

__all__ = ["Custody", "Stage", "Outcome", "SourceTree", "DestinationCopy", "ProcTree", "CustodyError",
           "UNCOMMITTED", "STOPPED_UNCOMMITTED"]

#: The destination's copy is restored, stopped, and waits for the commit.
STOPPED_UNCOMMITTED = "stopped (not committed)"
#: What the destination's copy can be after an abort without it ever having run.
UNCOMMITTED = frozenset({"none", "killed", "gone", STOPPED_UNCOMMITTED})


class Outcome(enum.StrEnum):
    """How a migration ended (``MigrationReport.outcome``)."""

    MIGRATED = "migrated"  # the destination runs it, the source is gone
    ROLLED_BACK = "rolled-back"  # the destination never took over; the source runs, memory intact
    REFUSED = "refused"  # stopped before anything was frozen
    FAILED_AFTER_RESUME = "failed-after-resume"  # a lazy flow broke after the destination resumed
    UNKNOWN = "unknown"  # the source is left stopped: the operator decides (the report says how)
    CHECKED = "checked"  # a dry run: everything before the freeze passed; nothing was frozen


class Stage(enum.Enum):
    UNTOUCHED = "untouched"
    PRE_COPIED = "pre-copied"
    FROZEN = "frozen"
    DUMPED = "dumped"
    CHECKPOINTED = "checkpointed"  # the dump ended the source; its images are the rollback
    COMMIT_SENT = "commit sent"
    COMMITTED = "committed"
    SERVING = "serving"
    HANDED_OVER = "handed over"
    RESUMED = "resumed"  # after a failure: the source runs again
    LEFT_STOPPED = "left stopped"  # after a failure: the source stays stopped (or, ended by its dump, in its images)


#: Every allowed move. Anything else is a bug in a flow, raised as :class:`CustodyError`.
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.UNTOUCHED: frozenset({Stage.PRE_COPIED, Stage.FROZEN}),
    Stage.PRE_COPIED: frozenset({Stage.PRE_COPIED, Stage.FROZEN, Stage.RESUMED}),
    Stage.FROZEN: frozenset({Stage.DUMPED, Stage.RESUMED}),
    Stage.DUMPED: frozenset({Stage.COMMIT_SENT, Stage.CHECKPOINTED, Stage.RESUMED}),
    Stage.CHECKPOINTED: frozenset({Stage.COMMIT_SENT, Stage.RESUMED, Stage.LEFT_STOPPED}),
    Stage.COMMIT_SENT: frozenset({Stage.COMMITTED, Stage.DUMPED, Stage.CHECKPOINTED, Stage.LEFT_STOPPED}),
    Stage.COMMITTED: frozenset({Stage.SERVING, Stage.HANDED_OVER}),
    Stage.SERVING: frozenset({Stage.HANDED_OVER, Stage.RESUMED, Stage.LEFT_STOPPED}),
    Stage.HANDED_OVER: frozenset(),
    Stage.RESUMED: frozenset(),
    Stage.LEFT_STOPPED: frozenset(),
}
#: From here on the destination may own the process: the source must never resume on its own.
MAY_BE_OWNED = frozenset({Stage.COMMIT_SENT, Stage.COMMITTED, Stage.SERVING, Stage.HANDED_OVER})


class CustodyError(AssertionError):
    """A flow reported an event that its stage does not allow (a bug in pycriu, not a failure
    of the migration)."""


class SourceTree(Protocol):
    """The source's process tree."""

    pid: int

    def state(self) -> str:
        """``running``, ``stopped`` or ``gone``."""
        ...

    def resume(self) -> None:
        """SIGCONT every process of it, until it runs."""
        ...

    def kill(self) -> bool:
        """SIGKILL every process of it; whether it existed."""
        ...

    def wait_gone(self) -> bool:
        """Wait (a few seconds) until a killed tree is gone; whether it is."""
        ...

    def frozen(self) -> None:
        """The dump froze it: its processes are the ones the dump will end or hand over."""
        ...

    def release(self) -> None:
        """The dump ended it: wait until its PIDs are free again (a restore in its PID namespace
        takes them back); :class:`~pycriu.errors.PidInUseError` when a zombie keeps one."""
        ...

    def restore_from_images(self) -> int:
        """Restore the tree on this host from the source's own images (its new root pid)."""
        ...


class DestinationCopy(Protocol):
    """The destination's copy, through the agent."""

    def abort(self, reason: str) -> str:
        """Have the destination drop its uncommitted copy (best effort); return what it is now:
        ``none``, ``killed``, ``gone``, ``stopped (not committed)`` or ``unknown (...)``."""
        ...


class ProcTree:
    """:class:`SourceTree` of a real process tree (:mod:`.procs`)."""

    def __init__(self, pid: int, restore: Callable[[], int] | None = None,
                 images_dir: Callable[[], Path | None] | None = None) -> None:
        self.pid = pid
        self._restore = restore
        self._images = images_dir  # the dump's images directory, once there is one
        self._pids: list[int] = []

    def frozen(self) -> None:
        # Only a tree in this PID namespace is restored under its own PIDs: a tree with a PID
        # namespace of its own gets a new one, whatever its old init's zombie keeps.
        self._pids = procs.tree_ids(self.pid) if procs.shares_pid_namespace(self.pid) else []

    def release(self) -> None:
        taken = procs.pids_taken(self._pids)
        if not taken:
            procs.hold_back_pids(self._pids)
        if taken:
            raise PidInUseError(
                f"the source's dump ended it, but {', '.join(taken)} still holds a PID its restore "
                "needs", operation="migrate",
                hint="a process that starts a workload must reap it (wait for it) when it exits, or "
                     "the workload should run in its own PID namespace; the images are kept")

    def state(self) -> str:
        return procs.tree_state(self.pid)

    def resume(self) -> None:
        procs.resume_until_running(self.pid, keep_stopped=self._stopped_before())

    def _stopped_before(self) -> dict[int, int]:
        """The processes the dump found stopped: a rollback leaves them stopped, as they were.
        (No complete images: CRIU resumed the tree itself, as it found it.)"""
        directory = self._images() if self._images is not None else None
        if directory is None or not (directory / "pstree.img").exists():
            return {}
        try:
            return images.stopped_tasks(directory)
        except (OSError, ValueError):
            return {}

    def kill(self) -> bool:
        return procs.kill_tree(self.pid) is not None

    def wait_gone(self) -> bool:
        return procs.wait_gone(self.pid)

    def restore_from_images(self) -> int:
        if self._restore is None:
            raise CustodyError("this tree has no images to be restored from")
        self.release()
        self.pid = self._restore()  # Criu.restore tries again while a PID is taken by nothing visible
        return self.pid


class Custody:
    """Who holds the process, from the first freeze to the end of the run."""

    def __init__(self, source: SourceTree, destination: DestinationCopy, note: Callable[[str], None]) -> None:
        self.source = source
        self.destination = destination
        self.note = note
        self.stage = Stage.UNTOUCHED
        self.outcome: Outcome | None = None  # decided; None until then
        self.destination_state = "none"
        self.destination_pid: int | None = None
        self.deferred: BaseException | None = None  # raised in post-dump once the commit was sent
        self.rollback = ""  # how the source came back, when it did
        self.images_kept_for: str | None = None  # why the source's images must outlive the run
        self.ends_at_dump = False  # the dump will end the source (one host: its images are the rollback)
        self._killed = False
        self._before_commit = Stage.DUMPED

    def __repr__(self) -> str:
        return f"<Custody {self.stage.value} outcome={self.outcome} destination={self.destination_state!r}>"

    def _to(self, stage: Stage) -> None:
        if stage not in TRANSITIONS[self.stage]:
            raise CustodyError(f"custody cannot go from {self.stage.value} to {stage.value}")
        self.stage = stage

    @property
    def may_be_owned(self) -> bool:
        """The commit may have reached the destination: the source must not resume on its own."""
        return self.stage in MAY_BE_OWNED

    @property
    def committed(self) -> bool:
        return self.stage in (Stage.COMMITTED, Stage.SERVING, Stage.HANDED_OVER)

    # -- events of a healthy migration ------------------------------------------------------------

    def pre_copying(self) -> None:
        """A pre-dump is about to freeze the tree briefly (CRIU resumes it)."""
        self._to(Stage.PRE_COPIED)

    def criu_notify(self, post_dump: Callable[[], None] | None, *, on_freeze: Callable[[], None],
                    on_dumped: Callable[[], None]) -> Callable[[str, int], bool]:
        """The notify callback of a dump. At ``pre-dump`` the tree is frozen; at ``post-dump`` its
        images are complete and ``post_dump`` runs (the flows send the images, restore and
        commit there). Before the commit was sent, an exception there makes CRIU resume the tree
        and is re-raised by the dump. Once it was sent, post-dump answers success whatever
        happens (the tree stays stopped, ``leave_stopped``) and the exception waits in
        :attr:`deferred` for :meth:`dump_returned`."""

        def callback(action: str, pid: int) -> bool:
            if action == "pre-dump":
                self._to(Stage.FROZEN)
                self.source.frozen()
                on_freeze()
            elif action == "post-dump":
                on_dumped()
                self._to(Stage.DUMPED)
                try:
                    if post_dump is not None:
                        post_dump()
                except BaseException as exc:
                    if self.may_be_owned:
                        self.deferred = exc
                        return True
                    raise
            return True

        return callback

    def restored(self, pid: int) -> None:
        """The destination restored its copy, held stopped until the commit."""
        self.destination_pid = pid
        self.destination_state = STOPPED_UNCOMMITTED

    def checkpointed(self) -> None:
        """The dump ended (killed) the source; its complete images on this host are the rollback.
        Returns once the source's PIDs are free for the destination's restore."""
        self._to(Stage.CHECKPOINTED)
        self.source.release()

    def commit_sending(self) -> None:
        """The commit is about to be sent: from now on assume it may arrive."""
        self._before_commit = self.stage
        self._to(Stage.COMMIT_SENT)

    def commit_not_delivered(self) -> None:
        """No whole commit left this host, or the agent refused it (and did not resume its copy):
        the source may come back again."""
        self._to(self._before_commit)

    def commit_acknowledged(self) -> None:
        """The destination resumed its copy: it owns the process."""
        self._to(Stage.COMMITTED)
        self.destination_state = "running"

    def dump_returned(self) -> None:
        """A non-lazy dump returned (the commit was inside its post-dump): kill the source once
        the destination acknowledged the commit, then raise what post-dump deferred."""
        if self.committed:
            self.hand_over()
        self.raise_deferred()

    def raise_deferred(self) -> None:
        exc, self.deferred = self.deferred, None
        if exc is not None:
            raise exc

    def serving(self) -> None:
        """(lazy flows) The destination runs; the frozen source serves its missing pages."""
        self._to(Stage.SERVING)

    def hand_over(self) -> None:
        """The destination owns the process: the stopped source tree goes (one ended by its
        dump is not signalled again: its pids may belong to others by now)."""
        self._to(Stage.HANDED_OVER)
        if not self.ended_by_dump:
            self._killed = self.source.kill()
        self.destination_state = "running"

    @property
    def ended_by_dump(self) -> bool:
        """The dump ended the source (one host, :mod:`.rollback`): its images are all there is of it."""
        return self.stage is Stage.CHECKPOINTED or self._before_commit is Stage.CHECKPOINTED

    def checked(self) -> None:
        """A dry run ended after the checks: nothing was ever frozen."""
        if self.stage is not Stage.UNTOUCHED:
            raise CustodyError(f"a dry run froze the tree (custody: {self.stage.value})")
        self.outcome = Outcome.CHECKED

    def succeeded(self) -> None:
        """The flow finished: it must have handed the process over."""
        if self.stage is not Stage.HANDED_OVER:
            raise CustodyError(f"a flow ended without handing the process over (custody: {self.stage.value})")
        self.outcome = Outcome.MIGRATED

    # -- what the destination reports after it resumed (lazy flows) -------------------------------

    def destination_failed(self, killed: bool) -> None:
        """The destination resumed, then failed (its page supply broke) and the agent killed its
        copy (``killed``): the source resumes from the checkpoint; what the destination did since
        the freeze is lost."""
        self.destination_state = "killed" if killed else "failed"
        self._resume(Outcome.FAILED_AFTER_RESUME)

    def destination_lost(self, *, source_done: bool, source_failed: bool) -> None:
        """The agent cannot be asked any more: decide from what the source's CRIU knows.
        ``source_done``: CRIU stopped serving pages; ``source_failed``: it saw the page
        connection fail (the destination's daemon is gone, so the agent killed its copy)."""
        if source_done and source_failed:
            self.destination_state = "killed (lazy-pages daemon failed)"
            self._resume(Outcome.FAILED_AFTER_RESUME)
            return
        if source_done:
            self.destination_state = "unknown (probably running)"
        self._leave_stopped()

    # -- failure ------------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Something failed: apply the one answer the current stage allows."""
        if self.outcome is not None or self.stage in (Stage.RESUMED, Stage.LEFT_STOPPED):
            return  # already decided (a lazy flow's end)
        if self.stage is Stage.UNTOUCHED:
            self.outcome = Outcome.REFUSED
        elif self.stage is Stage.COMMIT_SENT and self._before_commit is Stage.CHECKPOINTED:
            self.destination_state = "unknown (commit sent, not acknowledged)"
            self._to(Stage.LEFT_STOPPED)
            self.outcome = Outcome.UNKNOWN
            self.images_kept_for = "the commit was sent but not acknowledged"
            self.note(f"the commit was sent but not acknowledged, and the source was ended by its dump (one "
                      f"host, its images as the rollback): check the destination's pid {self.destination_pid}; if "
                      f"it does not run, restore the source from its images, which are kept (the report's log "
                      f"directory says where)")
        elif self.stage is Stage.COMMIT_SENT:
            self.destination_state = "unknown (commit sent, not acknowledged)"
            self._leave_stopped()
            pid = self.destination_pid
            self.note(f"the commit was sent but not acknowledged: the source is left STOPPED (pid "
                      f"{self.source.pid}) so that exactly one copy can run. Check the destination's pid {pid}: "
                      f"if it runs, the commit arrived: `kill -KILL` the source tree; if it is stopped or gone, "
                      f"the commit did not arrive: kill what is left of it and `kill -CONT` the source tree "
                      f"(every process of it). Resume only ONE copy")
        elif self.committed:
            if self.stage is not Stage.HANDED_OVER:
                self.hand_over()
            self.outcome = Outcome.MIGRATED
            self.note(f"the failure came after the destination acknowledged the commit: it owns the process "
                      f"(pid {self.destination_pid}) and the source was killed")
        elif self.stage is Stage.CHECKPOINTED:  # roll back from the source's images
            self.abort_destination(f"source failed: {reason}")
            self._restore_from_images("")
        else:  # pre-copied, frozen, dumped: roll back
            self.abort_destination(f"source failed: {reason}")
            state = self.source.state()
            if state == "gone" and self.stage is Stage.DUMPED and self.ends_at_dump:
                # post-dump said yes and CRIU ended the source, then the failure came (a Ctrl-C
                # held back until the dump returned): its complete images are all there is of it
                self._to(Stage.CHECKPOINTED)
                self._restore_from_images("")
                return
            if state == "stopped":
                self.source.resume()
                self.rollback = "the stopped source was resumed (SIGCONT)"
                self.note("the source tree was left stopped by CRIU and has been resumed (SIGCONT)")
            elif state == "running":
                self.rollback = "the source kept running (never stopped, or CRIU resumed it)"
            self._to(Stage.RESUMED)

    def abort_destination(self, reason: str) -> None:
        """Before the commit: the destination must not keep its (stopped) copy."""
        self.destination_state = self.destination.abort(reason)

    def _resume(self, outcome: Outcome) -> None:
        if self.ended_by_dump:
            if self._restore_from_images("; the destination's work since the freeze is lost"):
                self.outcome = outcome
            return
        self.source.resume()  # CRIU left it stopped (or resumed it itself)
        self.rollback = "the source resumed from the checkpoint (SIGCONT); the destination's work since is lost"
        self._to(Stage.RESUMED)
        self.outcome = outcome

    def _restore_from_images(self, lost: str) -> bool:
        """The source was ended by its dump: bring it back from its images on this host; if that
        fails, they are kept for the operator. Whether it runs again."""
        old = self.source.pid
        # kept until the restore is known to have worked, whatever ends it
        self.images_kept_for = "restoring the source from them did not finish"
        try:
            pid = self.source.restore_from_images()
        except Exception as exc:  # noqa: BLE001 - the images stay for the operator
            self._to(Stage.LEFT_STOPPED)
            self.outcome = Outcome.UNKNOWN
            self.images_kept_for = f"restoring the source from them failed: {exc}"
            self.note(f"the source (pid {old}) was ended by its dump and restoring it from its images failed "
                      f"({exc}); the images are kept: restore them with `criu restore`")
            return False
        self.images_kept_for = None
        self.rollback = f"restored from the source's own images on this host (new pid {pid}){lost}"
        self.note(f"the source tree (pid {old}) was {self.rollback}")
        self._to(Stage.RESUMED)
        return True

    def _leave_stopped(self) -> None:
        self._to(Stage.LEFT_STOPPED)
        self.outcome = Outcome.UNKNOWN
        if self.ended_by_dump and self.images_kept_for is None:
            self.images_kept_for = "the destination's state is unknown and the source was ended by its dump"

    # -- the end ------------------------------------------------------------------------------------

    def settle(self) -> str:
        """At the end of the run: wait for a killed source to be gone, read where it is, and
        decide an outcome not decided yet from what is measured. Returns the source's state."""
        if self._killed and not self.source.wait_gone():
            self.note(f"the source tree (pid {self.source.pid}) was sent SIGKILL but had not exited after 5 s")
        # A source ended by its dump and handed over is gone, whatever runs under its pid now (on
        # one host a tree in the host's PID namespace is restored with its own pids)
        # (and one left in its images: its pid may be the destination's copy's now)
        ended = self.ended_by_dump and self.stage in (Stage.HANDED_OVER, Stage.LEFT_STOPPED)
        state = "gone" if ended else self.source.state()
        if self.outcome is None or self.outcome is Outcome.UNKNOWN:
            uncommitted = self.destination_state in UNCOMMITTED or self.destination_state.startswith("unknown")
            if state == "running" and uncommitted and self.stage is not Stage.LEFT_STOPPED:
                self.outcome = Outcome.ROLLED_BACK
            elif self.outcome is None:
                self.outcome = Outcome.UNKNOWN
        if self.outcome in (Outcome.REFUSED, Outcome.CHECKED) and state == "running":
            return "running (never frozen)"
        return state
