"""Notify callbacks: CRIU tells the caller where it is in a dump or restore, and waits for the answer.

A callback receives ``(action, pid)``. Returning ``None`` or ``True`` lets CRIU go on; returning
``False`` or raising makes CRIU roll back. At ``post-dump`` the images are complete and the tree is
still frozen, so rolling back there resumes the tree instead of killing it: the safe point of a
migration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu import NotifyAction
from pycriu.workload import Workload

pytestmark = needs_root

WorkloadFactory = Callable[..., Workload]


class Recorder:
    """A notify callback that records every ``(action, pid)`` and can answer one action specially."""

    def __init__(self, answer_to: str | None = None, answer: object = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.answer_to = answer_to
        self.answer = answer

    def __call__(self, action: str, pid: int) -> bool | None:
        self.events.append((action, pid))
        if action == self.answer_to:
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer  # type: ignore[return-value]
        return None

    @property
    def actions(self) -> list[str]:
        return [action for action, _ in self.events]


def assert_in_order(actions: list[str], expected: list[str]) -> None:
    """``expected`` occurs in ``actions`` in this order (other actions may come in between)."""
    positions = [actions.index(a) for a in expected]
    assert positions == sorted(positions), f"{expected} out of order in {actions}"


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_dump_notifies_pre_dump_then_post_dump(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    seen_at_post_dump: dict[str, object] = {}

    def notify(action: str, pid: int) -> None:
        recorder(action, pid)
        if action == NotifyAction.POST_DUMP:
            # The images are on disk and the tree is frozen (ptrace-stopped), not yet killed.
            seen_at_post_dump["inventory"] = (images_dir / "inventory.img").exists()
            seen_at_post_dump["state"] = proc_state(w.pid)

    recorder = Recorder()
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=notify))

    assert recorder.actions[0] == NotifyAction.PRE_DUMP
    assert recorder.actions[-1] == NotifyAction.POST_DUMP
    assert_in_order(recorder.actions, ["pre-dump", "post-dump"])
    assert all(isinstance(action, str) and isinstance(pid, int) for action, pid in recorder.events)
    assert seen_at_post_dump == {"inventory": True, "state": "t"}
    # After post-dump answered success, CRIU killed the tree (the default).
    assert not w.alive()


def test_restore_notifies_from_pre_restore_to_post_resume_with_the_restored_pid(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))

    recorder = Recorder()
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir, notify=recorder))
    w.adopt(restored.pid)

    assert recorder.actions[0] == NotifyAction.PRE_RESTORE
    assert recorder.actions[-1] == NotifyAction.POST_RESUME
    assert_in_order(recorder.actions, ["pre-restore", "setup-namespaces", "post-setup-namespaces",
                                       "post-restore", "pre-resume", "post-resume"])
    # CRIU names the restored root only where it is first known: in setup-namespaces and post-restore.
    pids = dict(recorder.events)
    assert pids["setup-namespaces"] == restored.pid
    assert pids["post-restore"] == restored.pid
    w.wait_beats(3)


def test_an_exception_in_post_dump_reaches_the_caller_and_the_tree_resumes(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    class TransferFailed(Exception):
        pass

    w = workload(mib=8)
    recorder = Recorder(answer_to="post-dump", answer=TransferFailed("could not copy the images"))

    with pytest.raises(TransferFailed, match="could not copy the images"):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=recorder))

    assert recorder.actions[-1] == "post-dump"
    # The tree was not killed: CRIU resumed it, and it goes on beating with its memory intact.
    assert w.alive()
    assert proc_state(w.pid) not in ("t", "T")
    w.wait_beats(5)
    assert w.checksum() == w.expected_checksum


def test_answering_false_to_post_dump_raises_dump_error_and_the_tree_resumes(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    recorder = Recorder(answer_to="post-dump", answer=False)

    with pytest.raises(pycriu.DumpError, match="answered False to 'post-dump'") as info:
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=recorder))

    assert info.value.operation == "dump"
    assert info.value.log_path == str(images_dir / "dump.log")
    assert w.alive()
    w.wait_beats(5)
    assert w.checksum() == w.expected_checksum


def test_answering_false_before_the_dump_leaves_the_tree_untouched(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    recorder = Recorder(answer_to="pre-dump", answer=False)

    with pytest.raises(pycriu.DumpError):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=recorder))

    assert recorder.actions == ["pre-dump"]
    assert not list(images_dir.glob("pages-*.img"))
    w.wait_beats(3)


def test_answering_false_to_pre_restore_raises_restore_error_and_restores_nothing(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))

    with pytest.raises(pycriu.RestoreError, match="answered False to 'pre-restore'"):
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir, notify=Recorder("pre-restore", False)))

    # The images are untouched: a second restore works.
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    w.wait_beats(3)


def test_an_exception_in_post_restore_kills_the_half_restored_tree(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    recorder = Recorder("post-restore", RuntimeError("refuse the restored tree"))

    with pytest.raises(RuntimeError, match="refuse the restored tree"):
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir, notify=recorder))

    pid = dict(recorder.events)["post-restore"]
    w.adopt(pid)  # reaped at the end in any case
    deadline = time.monotonic() + 5
    while w.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.alive(pid)
    assert recorder.actions[-1] == "post-restore"


def test_callbacks_see_plain_strings_that_compare_equal_to_notify_actions() -> None:
    assert NotifyAction.POST_DUMP == "post-dump"
    assert NotifyAction("setup-namespaces") is NotifyAction.SETUP_NAMESPACES
    assert "post-resume" in {NotifyAction.POST_RESUME}
