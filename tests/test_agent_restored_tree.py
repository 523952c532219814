"""The destination's half of "exactly one copy runs" (:class:`RestoredTree`): what each event of
an agent session does to the tree CRIU restored stopped. A real stopped child stands in for the
restored tree (no root, no CRIU): the events act on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from pycriu.migration.agent_restored import RestoredTree, TreeKilled
from pycriu.migration.procs import tree_state


@pytest.fixture
def stopped_child() -> Iterator[subprocess.Popen[bytes]]:
    """A process as CRIU's leave_stopped restore leaves it: stopped, ours to resume or kill."""
    child = subprocess.Popen(["sleep", "60"])
    os.kill(child.pid, signal.SIGSTOP)
    _until(child.pid, "stopped")
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _until(pid: int, state: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while (now := tree_state(pid)) != state and time.monotonic() < deadline:
        time.sleep(0.005)
    return now


def _killed(child: subprocess.Popen[bytes]) -> bool:
    try:
        return child.wait(timeout=5) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


def test_an_abort_kills_an_uncommitted_tree(stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    tree.restored(stopped_child.pid)
    assert tree.abort() == stopped_child.pid
    assert _killed(stopped_child)


def test_the_commit_resumes_the_tree_and_later_aborts_leave_it_running(
        stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    tree.restored(stopped_child.pid)
    tree.commit()
    assert _until(stopped_child.pid, "running") == "running"
    assert tree.abort() is None
    assert not tree.session_ended()
    assert stopped_child.poll() is None


def test_a_commit_leaves_stopped_what_the_dump_found_stopped(stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    tree.keep_stopped = {stopped_child.pid: signal.SIGSTOP}
    tree.restored(stopped_child.pid)
    tree.commit()
    time.sleep(0.05)
    assert tree_state(stopped_child.pid) == "stopped"


def test_lost_pages_kill_even_a_committed_tree(stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    tree.restored(stopped_child.pid)
    tree.commit()
    assert tree.pages_lost() == stopped_child.pid
    assert _killed(stopped_child)


def test_a_session_that_ends_without_a_commit_kills_the_tree_once(stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    tree.restored(stopped_child.pid)
    assert tree.session_ended()
    assert not tree.session_ended()
    assert _killed(stopped_child)


def test_a_daemon_that_failed_during_the_restore_kills_the_tree(stopped_child: subprocess.Popen[bytes]) -> None:
    tree = RestoredTree()
    with pytest.raises(TreeKilled, match="lazy-pages daemon failed"):
        tree.restored(stopped_child.pid, daemon_failed=lambda: True)
    assert _killed(stopped_child)
    with pytest.raises(TreeKilled):
        tree.commit()


def test_a_session_without_a_restore_has_nothing_to_kill() -> None:
    tree = RestoredTree()
    assert tree.abort() is None
    assert tree.pages_lost() is None
    assert not tree.session_ended()
