"""A restore that finds one of its PIDs taken (``pycriu._pids``): what holds it, named from
``/proc``, and the decision to run the restore again (only while nothing visible holds it).
No root, no CRIU: real processes stand in for the holders and a function for the restore."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pycriu import RestoreError
from pycriu._pids import holders, pid_clash, retry_pid_clash


def _clash(pid: int) -> RestoreError:
    return RestoreError("restore failed", criu_message=f"Can't fork for {pid}: File exists (cr-restore.c:1237)")


def test_the_pid_is_read_from_criu_s_message() -> None:
    assert pid_clash("Can't fork for 4242: File exists (cr-restore.c:1237)") == 4242
    # a thread's TID taken: CRIU's restorer names no TID (zdtm's socket_aio found it)
    assert pid_clash("Unable to create a thread: -17 (criu/pie/restorer.c:2185)") == 0
    assert pid_clash("Unable to create a thread: -1 (criu/pie/restorer.c:2185)") is None  # EPERM: no clash
    assert pid_clash("Can't bind inet socket: Address already in use") is None
    assert pid_clash(None) is None


def test_a_taken_thread_id_is_tried_again_and_classified_as_a_pid_in_use(tmp_path: Path) -> None:
    """The restorer's thread clash: the same moment's state as a process's, tried again (no
    holder can be named), and a :class:`PidInUseError` with its own hint when it stays."""
    from pycriu import PidInUseError
    from pycriu._raw import check

    calls: list[int] = []

    def restore() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RestoreError("restore failed", criu_message="Unable to create a thread: -17 (restorer.c:2185)")
        return "restored"

    assert retry_pid_clash(restore, delay=0.01) == "restored" and len(calls) == 3
    log = tmp_path / "restore.log"
    log.write_text("(00.004829) pie: 31701: Error (criu/pie/restorer.c:2185): Unable to create a thread: -17\n")
    with pytest.raises(PidInUseError) as info:
        check(-errno.EBADE, "restore", log_path=str(log))
    assert "thread's id is in use" in (info.value.hint or "")


def test_a_dead_pid_has_no_holder(dead_pid: int) -> None:
    assert holders(dead_pid) == []


def _until(pid: int, pred: Callable[[list[str]], bool]) -> list[str]:
    deadline = time.monotonic() + 5
    while not pred(found := holders(pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_a_process_and_the_members_of_its_session_are_named() -> None:
    """A session leader whose child still runs: both keep the leader's PID taken."""
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        # sh waits for sleep, and its child has become sleep (before its exec it reads as 'sh')
        found = _until(leader.pid, lambda f: len(f) == 2 and "state S" in f[0] and "('sleep')" in f[1])
        assert found[0].startswith(f"pid {leader.pid} is a process ('sh', state S, parent {os.getpid()})"), found
        assert found[1].endswith(f"('sleep') is in the session {leader.pid}"), found
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_a_zombie_is_named_with_its_parent(zombie: tuple[int, int]) -> None:
    pid, parent = zombie
    found = _until(pid, lambda f: bool(f) and "zombie" in f[0])
    assert len(found) == 1, found
    assert found[0].startswith(f"pid {pid} is a zombie (") and found[0].endswith(f", state Z, parent {parent})")


def test_a_pid_taken_by_nothing_visible_is_tried_again(dead_pid: int) -> None:
    calls: list[int] = []

    def clashing_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _clash(dead_pid)
        return "restored"

    assert retry_pid_clash(clashing_twice, delay=0) == "restored"
    assert len(calls) == 3


def test_a_pid_a_process_holds_is_not_waited_for() -> None:
    calls: list[int] = []

    def clash_with_ourselves() -> str:
        calls.append(1)
        raise _clash(os.getpid())

    with pytest.raises(RestoreError):
        retry_pid_clash(clash_with_ourselves, delay=0)
    assert len(calls) == 1


def test_other_failures_and_the_last_attempt_are_raised(dead_pid: int) -> None:
    calls: list[int] = []

    def other_failure() -> str:
        calls.append(1)
        raise RestoreError("restore failed", criu_message="Can't bind inet socket: Address already in use")

    with pytest.raises(RestoreError, match="restore failed"):
        retry_pid_clash(other_failure, delay=0)
    assert len(calls) == 1

    calls.clear()

    def always() -> str:
        calls.append(1)
        raise _clash(dead_pid)

    with pytest.raises(RestoreError):
        retry_pid_clash(always, attempts=3, delay=0)
    assert len(calls) == 3
