"""The destination's half of "exactly one copy runs": the tree a session restored stays stopped
until the source commits, and every other end of the session (abort, a lost source, a failed
lazy-pages daemon, a timeout, the agent's own death through the guard) kills it. The source's
half is :mod:`.custody`."""

from __future__ import annotations

import threading
import time

from .guard import Guard
from .procs import kill_tree, resume_tree

__all__ = ["RestoredTree", "TreeKilled"]


class TreeKilled(Exception):
    """The commit came for a tree that was already killed (its lazy-pages daemon failed)."""


class RestoredTree:
    """The restored tree's pid and fate; every change under one lock (the lazy-pages watcher
    and the session's thread both decide)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.committed = False
        self.killed: int | None = None  # how many tasks were killed, once they were
        self.guard: Guard | None = None  # kills what it holds if this agent dies
        #: processes the dump found stopped (their own pids): the commit leaves them stopped
        self.keep_stopped: dict[int, int] = {}

    def hold(self, pid: int) -> None:
        """The guard holds ``pid`` from the moment CRIU names it (before the restore returns)."""
        if self.guard is not None:
            self.guard.hold(pid)

    def restored(self, pid: int) -> None:
        """CRIU restored the tree, stopped: the session now owns it."""
        with self.lock:
            self.pid = pid
            self.hold(pid)

    def kill(self, *, committed_too: bool = False) -> int | None:
        """Kill the tree unless the source committed it or it is already dead; return
        :attr:`killed`. ``committed_too``: also a committed tree, one that can no longer run
        correctly (its lazy pages will never come)."""
        with self.lock:
            return self.kill_locked(committed_too=committed_too)

    def kill_locked(self, *, committed_too: bool = False) -> int | None:
        """:meth:`kill`, for a caller that holds :attr:`lock` (a decision made with other state)."""
        if self.pid is not None and (committed_too or not self.committed) and self.killed is None:
            self.killed = kill_tree(self.pid)
        return self.killed

    def commit(self) -> float:
        """The source gave the process up: release it from the guard and resume it (CRIU left
        every task stopped; the ones stopped before the dump stay so). Returns the monotonic time of the resume. Raises
        :class:`TreeKilled` when the tree was killed already."""
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
