"""The destination's half of "exactly one copy runs": the tree a session restored stays stopped
until the source commits, and every other end of the session (abort, a lost source, a failed
lazy-pages daemon, a timeout, the agent's own death through the guard) kills it. The source's
half is :mod:`.custody`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .guard import Guard
from .procs import kill_tree, resume_tree

__all__ = ["RestoredTree", "TreeKilled"]


class TreeKilled(Exception):
    """The commit came for a tree that was already killed (its lazy-pages daemon failed)."""


class RestoredTree:
    """The restored tree's pid and fate, one method per event of the session; every change
    under one lock (the lazy-pages watcher and the session's thread both decide)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.committed = False
        self.killed: int | None = None  # how many tasks were killed, once they were
        self.guard: Guard | None = None  # kills what it holds if this agent dies
        #: processes the dump found stopped (their own pids): the commit leaves them stopped
        self.keep_stopped: dict[int, int] = {}

    def hold(self, pid: int) -> None:
        """CRIU named the tree (before its restore returns): the guard holds ``pid`` from now on."""
        if self.guard is not None:
            self.guard.hold(pid)

    def restored(self, pid: int, daemon_failed: Callable[[], bool] | None = None) -> None:
        """CRIU restored the tree, stopped: the session now owns it. ``daemon_failed`` (asked
        under the lock) says whether the lazy-pages daemon died meanwhile: then the tree has
        holes, is killed, and :class:`TreeKilled` is raised."""
        with self.lock:
            self.pid = pid
            self.hold(pid)
            if daemon_failed is not None and daemon_failed():
                self._kill(committed_too=False)
                raise TreeKilled("the lazy-pages daemon failed during the restore; the restored tree was killed")

    def commit(self) -> float:
        """The source gave the process up: release it from the guard and resume it (CRIU left
        every task stopped; the ones stopped before the dump stay so). Returns the monotonic
        time of the resume. Raises :class:`TreeKilled` when the tree was killed already."""
        assert self.pid is not None
        with self.lock:
            if self.killed is not None:
                raise TreeKilled("the restored tree was already killed")
            self.committed = True
            if self.guard is not None:
                self.guard.release()  # before the resume: the guard never kills a running tree
            t_resume = time.monotonic()
            resume_tree(self.pid, self.keep_stopped)
        return t_resume

    def abort(self) -> int | None:
        """The source aborted: kill the tree unless it was committed; return :attr:`killed`."""
        with self.lock:
            return self._kill(committed_too=False)

    def pages_lost(self) -> int | None:
        """Its lazy pages will never all come (the transfer timed out): kill the tree even if
        committed, since the kernel would fill the holes with zeros; return :attr:`killed`."""
        with self.lock:
            return self._kill(committed_too=True)

    def pages_lost_locked(self) -> int | None:
        """:meth:`pages_lost`, for the lazy-pages watcher, which holds :attr:`lock` to record
        the daemon's exit status with it."""
        return self._kill(committed_too=True)

    def session_ended(self) -> bool:
        """The session ends: a tree never committed is killed. Returns whether this killed it."""
        with self.lock:
            if self.pid is None or self.committed or self.killed is not None:
                return False
            self._kill(committed_too=False)
            return True

    def _kill(self, *, committed_too: bool) -> int | None:
        if self.pid is not None and (committed_too or not self.committed) and self.killed is None:
            self.killed = kill_tree(self.pid)
        return self.killed
