"""The agent's dead-man switch: a restored tree that was never committed dies with its agent.

The agent restores a tree stopped and resumes it only on the source's commit. If the agent itself
dies in between (SIGKILL, OOM, a crash), nobody would ever resume or kill that stopped tree. So each
agent session starts a guard: a tiny process in its own session (a signal to the agent's process
group does not reach it) that reads the agent's orders on a pipe:

``hold PID``
    the tree rooted at PID is restored but not committed;
``release``
    it was committed (or the agent killed it itself): forget it;
``remove DIR``
    remove DIR when the pipe closes (the session's images in ``/dev/shm``: RAM that nothing else
    would free before a reboot).

When the pipe closes (the agent exited, whatever the reason) while a tree is held, the guard kills
it; then it removes the directories it was given (the agent normally did already). The agent
writes ``release`` before it resumes a committed tree, so the guard never kills a running tree:
an agent dying inside that window leaves it stopped, the source too (it never got the
acknowledgement), and the report of the source says so.

Started as ``python -I -S guard.py LOG`` (by path, no ``pycriu`` import: a few milliseconds); it
writes to LOG (in the session's kept ``work`` directory) only when it kills a tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import IO, Any

__all__ = ["Guard", "serve"]


def _kill(pidfd: int, pid: int) -> None:
    """SIGKILL the held tree, if ``pidfd`` still names a live process (no pid reuse)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return
    _procs().kill_tree(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # the root by its pidfd too: no pid reuse
    except OSError:
        pass


def _procs() -> Any:
    """:mod:`pycriu.migration.procs` (standard library only), also when this file runs as a
    script by path, without the package."""
    if __package__:
        from . import procs
        return procs
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import procs  # type: ignore[import-not-found,no-redef]  # noqa: I001 - the sibling file itself
    return procs


def serve(orders: IO[str], log_path: str) -> int:
    """Follow the agent's orders until the pipe closes; kill what is still held then."""
    held: tuple[int, int] | None = None
    remove: list[str] = []
    for line in orders:
        word, _, arg = line.rstrip("\n").partition(" ")
        if word == "remove":
            remove.append(arg)
        elif word == "hold":
            if held is not None:
                os.close(held[0])
                held = None
            pid = int(arg)
            try:
                held = (os.pidfd_open(pid), pid)
            except OSError:  # already gone (a restore that failed after naming it)
                pass
        elif word == "release" and held is not None:
            os.close(held[0])
            held = None
    if held is not None:
        _kill(*held)
        try:
            with open(log_path, "a") as log:
                log.write(f"pycriu guard: the session ended before the commit: killed its restored tree {held[1]}\n")
        except OSError:
            pass
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)
    return 0


class Guard:
    """The agent side: owns the guard process and the pipe that is its lifeline."""

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, os.fspath(log_path)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, text=True, close_fds=True)

    def _order(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the guard died: it only ever was a safety net
            pass

    def hold(self, pid: int) -> None:
        """``pid``'s tree is restored, not committed: kill it if this process dies."""
        self._order(f"hold {pid}")

    def remove_at_exit(self, path: str | os.PathLike[str]) -> None:
        """Remove ``path`` when this process exits, whatever the reason."""
        self._order(f"remove {os.fspath(path)}")

    def release(self) -> None:
        """The held tree is committed (or already killed): never touch it."""
        self._order("release")

    def stop(self) -> None:
        """Close the pipe: the guard kills what it still holds (a tree the agent failed to kill,
        or does not know it restored), removes its directories and exits. A committed tree was
        released at the commit."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass

    def close(self) -> None:
        """:meth:`stop`, and reap the guard."""
        from .._process import stop_process  # here: the guard itself runs by path, without pycriu

        self.stop()
        stop_process(self._proc, 5, ask=None)

    @property
    def pid(self) -> int:
        return self._proc.pid


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the agent, not for us
    status = serve(sys.stdin, sys.argv[1])
    # nothing is left to flush (the log is closed): skip the interpreter's teardown (7 to 10 ms
    # that the agent, and through it the source, wait for at the end of every session)
    os._exit(status)
