"""Custody: every failure point of every flow, in every state the source can be in, has exactly
one allowed outcome, and never leaves two running copies.

A fake CRIU fires the real notifications in order (pre-dump, then post-dump; a failure in
post-dump resumes the tree, as CRIU does; ``leave_stopped`` keeps it stopped otherwise) and a
fake agent restores, commits and aborts a fake copy; :class:`~pycriu.migration.custody.Custody`
is driven the way the flows drive it. No root, no CRIU: the end-to-end fault tests
(``test_migration_failures.py``) check the same outcomes on real processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pycriu.migration.custody import (
    MAY_BE_OWNED,
    STOPPED_UNCOMMITTED,
    TRANSITIONS,
    Custody,
    CustodyError,
    Outcome,
    Stage,
)


class Injected(Exception):
    """The failure a scenario injects."""


@dataclass
class FakeTree:
    """The source tree: running, stopped or gone, and what was done to it."""

    pid: int = 100
    now: str = "running"
    actions: list[str] = field(default_factory=list)

    def state(self) -> str:
        return self.now

    def resume(self) -> None:
        self.actions.append("resume")
        if self.now == "stopped":
            self.now = "running"

    def kill(self) -> bool:
        self.actions.append("kill")
        existed, self.now = self.now != "gone", "gone"
        return existed

    def wait_gone(self) -> bool:
        return self.now == "gone"

    def frozen(self) -> None:
        pass  # the real tree notes its PIDs (tests/test_migration_procs.py)

    def release(self) -> None:
        pass

    restorable: bool = True

    def restore_from_images(self) -> int:
        self.actions.append("restore")
        if not self.restorable:
            raise OSError("criu restore failed")
        self.pid, self.now = self.pid + 1, "running"
        return self.pid


@dataclass
class FakeAgent:
    """The destination's copy: none, stopped (restored, not committed), running or killed."""

    copy: str = "none"
    reachable: bool = True
    committed: bool = False

    def restore(self) -> int:
        self.copy = "stopped"
        return 200

    def commit(self) -> None:
        self.copy = "running"
        self.committed = True

    def abort(self, reason: str) -> str:
        if not self.reachable:
            return "unknown (the agent was unreachable)" if self.copy != "none" else "none"
        if self.copy == "stopped":
            self.copy = "killed"
        return "killed" if self.copy == "killed" else self.copy


class FakeCriu:
    """``dump`` with a notify callback, as libcriu runs it."""

    def __init__(self, tree: FakeTree) -> None:
        self.tree = tree

    def dump(self, notify: Callable[[str, int], bool], *, fail_frozen: bool = False) -> None:
        notify("pre-dump", self.tree.pid)
        self.tree.now = "stopped"
        if fail_frozen:  # CRIU fails while dumping: it resumes the tree and reports the error
            self.tree.now = "running"
            raise Injected("dump failed")
        try:
            ok = notify("post-dump", self.tree.pid)
        except BaseException:
            self.tree.now = "running"  # post-dump failed: CRIU resumes the tree
            raise
        if not ok:
            self.tree.now = "running"
            raise Injected("post-dump refused")
        # leave_stopped: the tree stays stopped


@dataclass
class World:
    tree: FakeTree = field(default_factory=FakeTree)
    agent: FakeAgent = field(default_factory=FakeAgent)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.custody = Custody(self.tree, self.agent, self.notes.append)
        self.criu = FakeCriu(self.tree)

    def commit(self, *, lazy: bool, lost: bool = False, refused: bool = False, after_ack: bool = False) -> None:
        """What ``MigrationRun.restore_and_commit`` does around ``AgentClient.commit``."""
        self.custody.commit_sending()
        if refused:
            self.custody.commit_not_delivered()
            raise Injected("commit refused")
        if lost:
            raise Injected("link lost after the commit was sent")
        self.agent.commit()
        self.custody.commit_acknowledged()
        if lazy:
            self.custody.serving()
        if after_ack:
            raise Injected("Ctrl-C right after the acknowledgement")

    def run(self, flow: Callable[[World], None], *, external: str | None = None) -> Outcome:
        """Run ``flow``; on failure, ``external`` is what happened to the source meanwhile
        (``"gone"``: someone killed it)."""
        try:
            flow(self)
            self.custody.succeeded()
        except Injected as exc:
            if external is not None:
                self.tree.now = external
            self.custody.fail(str(exc))
        self.custody.settle()
        assert self.custody.outcome is not None
        return self.custody.outcome


# --- the flows, with a failure point each ----------------------------------------------------------


def classic(at: str | None) -> Callable[[World], None]:
    """Dump; in post-dump send, restore and commit; after the dump kill the source."""

    def flow(w: World) -> None:
        if at == "checks":
            raise Injected("destination refused the hello")

        def post_dump() -> None:
            if at == "send":
                raise Injected("image transfer failed")
            w.custody.restored(w.agent.restore())
            if at == "restore":
                raise Injected("restore reply lost")
            w.commit(lazy=False, lost=at == "commit-lost", refused=at == "commit-refused",
                     after_ack=at == "after-ack")

        w.criu.dump(w.custody.criu_notify(post_dump, on_freeze=lambda: None, on_dumped=lambda: None),
                    fail_frozen=at == "dump")
        w.custody.dump_returned()

    return flow


def classic_one_host(at: str | None) -> Callable[[World], None]:
    """One host (rollback.py): the images travel in post-dump, the dump ends the source, then
    restore and commit; the source's images are the rollback."""

    def flow(w: World) -> None:
        def post_dump() -> None:
            if at == "send":
                raise Injected("image transfer failed")

        w.custody.ends_at_dump = True  # the handshake's choice (rollback.py)
        w.criu.dump(w.custody.criu_notify(post_dump, on_freeze=lambda: None, on_dumped=lambda: None))
        w.tree.now = "gone"  # no leave_stopped: CRIU ends the tree
        if at == "dump-returned":  # a Ctrl-C held back while CRIU worked, raised as the dump returns
            raise Injected("KeyboardInterrupt")
        w.custody.checkpointed()
        if at == "restore":
            raise Injected("the destination's restore failed")
        w.custody.restored(w.agent.restore())
        w.commit(lazy=False, lost=at == "commit-lost", refused=at == "commit-refused")
        w.custody.hand_over()

    return flow


def pre_copy(at: str | None) -> Callable[[World], None]:
    def flow(w: World) -> None:
        for _ in range(2):
            w.custody.pre_copying()
            if at == "pre-dump":
                raise Injected("pre-dump failed")
        classic(None)(w)

    return flow


def _restore_lazily(w: World, at: str | None) -> None:
    """Restore, commit, then the pages are served: the end of every lazy flow."""
    w.custody.restored(w.agent.restore())
    w.commit(lazy=True, lost=at == "commit-lost")
    if at == "destination-failed":
        w.agent.copy = "killed"
        w.custody.destination_failed(killed=True)
        raise Injected("lazy page transfer failed after the destination resumed")
    if at and at.startswith("lost-"):
        w.custody.destination_lost(source_done=at != "lost-still-serving",
                                   source_failed=at == "lost-transfer-failed")
        raise Injected("lost the agent")
    w.custody.hand_over()


def lazy(at: str | None) -> Callable[[World], None]:
    """Post-dump answers at once; restore and commit after it; then the pages are served."""

    def flow(w: World) -> None:
        w.criu.dump(w.custody.criu_notify(None, on_freeze=lambda: None, on_dumped=lambda: None))
        if at == "restore":
            raise Injected("restore failed (tree left stopped by CRIU)")
        _restore_lazily(w, at)

    return flow


def lazy_one_host(at: str | None) -> Callable[[World], None]:
    """One host, post-copy (page-server-on-source): the dump ends the source;
    the destination restores lazily from a page server over the source's images, commits, and
    its missing pages are then served from those images."""

    def flow(w: World) -> None:
        w.custody.ends_at_dump = True
        w.criu.dump(w.custody.criu_notify(None, on_freeze=lambda: None, on_dumped=lambda: None))
        w.tree.now = "gone"
        w.custody.checkpointed()
        if at == "restore":
            raise Injected("the destination's restore failed")
        _restore_lazily(w, at)

    return flow


# scenario -> (outcome, source at the end, destination's copy at the end)
TABLE: dict[tuple[str, str | None], tuple[Outcome, str, str]] = {
    ("classic", None): (Outcome.MIGRATED, "gone", "running"),
    ("classic", "checks"): (Outcome.REFUSED, "running", "none"),
    ("classic", "dump"): (Outcome.ROLLED_BACK, "running", "none"),
    ("classic", "send"): (Outcome.ROLLED_BACK, "running", "none"),
    ("classic", "restore"): (Outcome.ROLLED_BACK, "running", "killed"),
    ("classic", "commit-refused"): (Outcome.ROLLED_BACK, "running", "killed"),
    ("classic", "commit-lost"): (Outcome.UNKNOWN, "stopped", "stopped"),
    ("classic", "after-ack"): (Outcome.MIGRATED, "gone", "running"),
    ("one-host", None): (Outcome.MIGRATED, "gone", "running"),
    ("one-host", "send"): (Outcome.ROLLED_BACK, "running", "none"),
    ("one-host", "dump-returned"): (Outcome.ROLLED_BACK, "running", "none"),
    ("one-host", "restore"): (Outcome.ROLLED_BACK, "running", "none"),
    ("one-host", "commit-refused"): (Outcome.ROLLED_BACK, "running", "killed"),
    ("one-host", "commit-lost"): (Outcome.UNKNOWN, "gone", "stopped"),
    ("pre-copy", None): (Outcome.MIGRATED, "gone", "running"),
    ("pre-copy", "pre-dump"): (Outcome.ROLLED_BACK, "running", "none"),
    ("lazy", None): (Outcome.MIGRATED, "gone", "running"),
    ("lazy", "restore"): (Outcome.ROLLED_BACK, "running", "none"),
    ("lazy", "commit-lost"): (Outcome.UNKNOWN, "stopped", "stopped"),
    ("lazy", "destination-failed"): (Outcome.FAILED_AFTER_RESUME, "running", "killed"),
    ("lazy", "lost-still-serving"): (Outcome.UNKNOWN, "stopped", "running"),
    ("lazy", "lost-served-all"): (Outcome.UNKNOWN, "stopped", "running"),
    ("lazy", "lost-transfer-failed"): (Outcome.FAILED_AFTER_RESUME, "running", "running"),
    ("lazy-one-host", None): (Outcome.MIGRATED, "gone", "running"),
    ("lazy-one-host", "restore"): (Outcome.ROLLED_BACK, "running", "none"),
    ("lazy-one-host", "commit-lost"): (Outcome.UNKNOWN, "gone", "stopped"),
    ("lazy-one-host", "destination-failed"): (Outcome.FAILED_AFTER_RESUME, "running", "killed"),
    ("lazy-one-host", "lost-still-serving"): (Outcome.UNKNOWN, "gone", "running"),
    ("lazy-one-host", "lost-served-all"): (Outcome.UNKNOWN, "gone", "running"),
    ("lazy-one-host", "lost-transfer-failed"): (Outcome.FAILED_AFTER_RESUME, "running", "running"),
}
FLOWS = {"classic": classic, "one-host": classic_one_host, "pre-copy": pre_copy, "lazy": lazy,
         "lazy-one-host": lazy_one_host}


@pytest.mark.parametrize(("flow", "at"), list(TABLE), ids=[f"{f}-{a or 'ok'}" for f, a in TABLE])
def test_every_failure_point_has_one_outcome(flow: str, at: str | None) -> None:
    w = World()
    outcome = w.run(FLOWS[flow](at))
    expected, source, copy = TABLE[flow, at]
    assert (outcome, w.tree.now, w.agent.copy) == (expected, source, copy), w.notes
    if flow in ("lazy", "lazy-one-host") and at == "lost-transfer-failed":
        # the fake agent cannot kill its copy: in the real world its lazy-pages daemon died and
        # the agent killed the restored tree; custody says so and resumes the source
        assert w.custody.destination_state == "killed (lazy-pages daemon failed)"
    else:
        assert not (w.tree.now == "running" and w.agent.copy == "running"), "two running copies"


@pytest.mark.parametrize(("flow", "at"), [k for k, v in TABLE.items()
                                          if v[0] is Outcome.ROLLED_BACK and not k[0].endswith("one-host")])
def test_a_source_that_vanished_meanwhile_is_never_called_rolled_back(flow: str, at: str) -> None:
    """Someone killed the source while the migration failed: nothing is resumed, nothing
    claims the process survived."""
    w = World()
    assert w.run(FLOWS[flow](at), external="gone") is Outcome.UNKNOWN
    assert "resume" not in w.tree.actions and w.tree.now == "gone"


@pytest.mark.parametrize("at", ["restore", "commit-refused"])
def test_an_unreachable_agent_leaves_its_copy_stopped_and_the_source_runs(at: str) -> None:
    w = World(agent=FakeAgent(reachable=False))
    assert w.run(classic(at)) is Outcome.ROLLED_BACK
    assert w.tree.now == "running" and w.agent.copy == "stopped"
    assert w.custody.destination_state.startswith("unknown")


def test_a_source_ended_by_its_dump_is_not_killed_again_when_its_pids_run_the_destination() -> None:
    """One host, a tree in the host's PID namespace: CRIU restores the destination's copy with
    the source's own pids. The hand-over must not SIGKILL "the source" (it would kill the
    destination) and the source reads as gone though its pid runs again."""
    w = World()

    def flow(w: World) -> None:
        w.criu.dump(w.custody.criu_notify(None, on_freeze=lambda: None, on_dumped=lambda: None))
        w.tree.now = "gone"  # CRIU ended it
        w.custody.checkpointed()
        w.custody.restored(w.agent.restore())
        w.tree.now = "running"  # its pid now belongs to the destination's copy
        w.commit(lazy=False)
        w.custody.hand_over()

    assert w.run(flow) is Outcome.MIGRATED
    assert "kill" not in w.tree.actions and w.tree.now == "running"
    assert w.custody.settle() == "gone"


def test_once_the_commit_may_have_arrived_post_dump_answers_success() -> None:
    """A failure inside post-dump after the commit was sent must not make CRIU resume the
    source: post-dump answers success, and the failure is raised once the dump returned."""
    w = World()
    w.custody.criu_notify(None, on_freeze=lambda: None, on_dumped=lambda: None)("pre-dump", 1)
    w.custody.restored(200)

    def post_dump() -> None:
        w.custody.commit_sending()
        raise Injected("link lost")

    answer = w.custody.criu_notify(post_dump, on_freeze=lambda: None, on_dumped=lambda: None)("post-dump", 1)
    assert answer is True
    assert isinstance(w.custody.deferred, Injected)
    with pytest.raises(Injected):
        w.custody.dump_returned()


def test_a_flow_that_ends_without_handing_over_is_a_bug_not_a_success() -> None:
    w = World()
    w.criu.dump(w.custody.criu_notify(None, on_freeze=lambda: None, on_dumped=lambda: None))
    with pytest.raises(CustodyError, match="without handing the process over"):
        w.custody.succeeded()


@pytest.mark.parametrize(("start", "end"), [(a, b) for a, b in itertools.product(Stage, Stage)
                                            if b not in TRANSITIONS[a]])
def test_every_move_outside_the_table_is_refused(start: Stage, end: Stage) -> None:
    custody = Custody(FakeTree(), FakeAgent(), lambda _: None)
    custody.stage = start
    with pytest.raises(CustodyError):
        custody._to(end)  # noqa: SLF001


def test_from_a_possible_commit_the_source_resumes_only_when_the_destination_failed() -> None:
    """The rule as a property of the table: every path from 'commit sent' to 'resumed' goes
    through a commit that was not delivered (back to 'dumped' or 'checkpointed') or through
    'serving' (the destination resumed and then failed)."""
    def paths(stage: Stage, seen: tuple[Stage, ...]) -> list[tuple[Stage, ...]]:
        if stage is Stage.RESUMED:
            return [seen]
        return [p for nxt in TRANSITIONS[stage] if nxt not in seen for p in paths(nxt, (*seen, nxt))]

    found = paths(Stage.COMMIT_SENT, (Stage.COMMIT_SENT,))
    assert found
    for path in found:
        assert path[1] in (Stage.DUMPED, Stage.CHECKPOINTED, Stage.COMMITTED), path
        assert path[1] is not Stage.COMMITTED or Stage.SERVING in path, path
    assert Stage.RESUMED not in {s for owned in MAY_BE_OWNED - {Stage.SERVING} for s in TRANSITIONS[owned]}


def test_a_restored_copy_waits_stopped_until_the_commit() -> None:
    w = World()
    w.custody.restored(200)
    assert (w.custody.destination_state, w.custody.destination_pid) == (STOPPED_UNCOMMITTED, 200)


@pytest.mark.parametrize("at", ["dump-returned", "restore", "commit-refused"])
def test_on_one_host_the_rollback_is_a_restore_from_the_source_images(at: str) -> None:
    w = World()
    assert w.run(classic_one_host(at)) is Outcome.ROLLED_BACK
    assert w.tree.actions.count("restore") == 1 and w.tree.pid == 101
    assert w.custody.rollback == "restored from the source's own images on this host (new pid 101)"
    assert w.custody.images_kept_for is None


@pytest.mark.parametrize("at", ["commit-lost", "restore"])
def test_images_that_are_the_only_copy_are_kept(at: str) -> None:
    """A lost commit acknowledgement, or a failed restore from the images: the images may be the
    only copy of the process left, so they outlive the run."""
    w = World(tree=FakeTree(restorable=False))
    assert w.run(classic_one_host(at)) is Outcome.UNKNOWN
    assert w.custody.images_kept_for


@pytest.mark.parametrize("flow", [classic_one_host, lazy_one_host])
def test_a_source_ended_by_its_dump_is_never_signalled_again(
        flow: Callable[[str | None], Callable[[World], None]]) -> None:
    """Its pids may belong to other processes by the time the destination takes over."""
    w = World()
    assert w.run(flow(None)) is Outcome.MIGRATED
    assert "kill" not in w.tree.actions and "resume" not in w.tree.actions


def test_a_post_copy_that_fails_after_the_resume_restores_an_ended_source_from_its_images() -> None:
    w = World()
    assert w.run(lazy_one_host("destination-failed")) is Outcome.FAILED_AFTER_RESUME
    assert w.tree.actions == ["restore"]
    assert w.custody.rollback.startswith("restored from the source's own images on this host (new pid 101)")
    assert "work since the freeze is lost" in w.custody.rollback


@pytest.mark.parametrize("at", ["lost-still-serving", "lost-served-all"])
def test_an_ended_source_whose_destination_is_unknown_keeps_its_images(at: str) -> None:
    w = World()
    assert w.run(lazy_one_host(at)) is Outcome.UNKNOWN
    assert w.custody.images_kept_for and "kill" not in w.tree.actions


@pytest.mark.parametrize(("flow", "at"), [(classic_one_host, "commit-lost"), (lazy_one_host, "lost-served-all")])
def test_an_ended_source_left_in_its_images_reads_gone_whatever_has_its_pid(
        flow: Callable[[str | None], Callable[[World], None]], at: str) -> None:
    """In the destination's PID namespace the restored copy takes the source's own pids: what
    runs under the old pid is the destination's copy, not the source (which is its images)."""
    w = World()
    assert w.run(flow(at), external="running") is Outcome.UNKNOWN
    assert w.custody.settle() == "gone"
    assert w.custody.images_kept_for
