"""Work around CRIU 4.2's 200 ms stall at the end of every dump into a page server.

CRIU corks its connection to the page server (``TCP_CORK``) when it opens it, and pushes each
command that needs an answer out with ``TCP_NODELAY``, except the last: in
``disconnect_from_page_server()`` it sends ``PS_IOV_CLOSE`` and waits for the answer while the
command sits in the corked socket until the kernel's 200 ms cork timer fires. The tree is frozen
all that time (measured: "Disconnect from the page server" is followed 204 to 229 ms later by
"Unfreezing tasks", with libcriu and with the ``criu`` command line alike).

:class:`Uncork` takes the cork off that one socket from outside, while the dump runs: it finds
the connection to the page server's port (sock_diag), the ``criu`` process of ours that holds it
(``/proc/PID/fd``), borrows the descriptor (``pidfd_getfd``), and once CRIU has corked it, clears
``TCP_CORK``. CRIU has already set ``TCP_NODELAY`` on it by then, so every later write leaves at
once, the close command included. The pages themselves are unaffected (large writes). Nothing is
done when anything is missing (another kernel, no permission, a CRIU that does not cork): the
dump then simply takes its 200 ms, as before.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

from .._threads import Worker
from . import procs

__all__ = ["Uncork"]

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (since Linux 5.6)
_libc = ctypes.CDLL(None, use_errno=True)


def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def _holder(inode: int, pids: list[int]) -> tuple[int, int] | None:
    """(pid, fd) of the process among ``pids`` that holds socket ``inode``."""
    link = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return pid, int(fd)
            except OSError:
                continue
    return None


class Uncork:
    """While a dump into the page server at ``port`` runs (``with`` block), uncork CRIU's
    connection to it. ``done`` says whether it was done; ``note`` why not."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = False
        self.note = "CRIU's page-server connection was not seen"
        self._stop = threading.Event()
        self._thread = Worker(self._watch, name=f"pycriu-uncork-{port}")

    def __enter__(self) -> Uncork:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            try:
                if self._try():
                    return
            except OSError as exc:
                self.note = f"could not uncork CRIU's page-server connection: {exc}"
                return

    def _try(self) -> bool:
        conns = [inode for _, dport, inode in procs.tcp_sockets(procs.TCP_ESTABLISHED) if dport == self.port]
        if not conns:
            return False
        mine = [p for p in procs.descendants(os.getpid()) if p != os.getpid() and procs.comm(p) == "criu"]
        for inode in conns:
            held = _holder(inode, mine)
            if held is None:
                continue
            fd = _pidfd_getfd(*held)
            try:
                sk = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                raise
            with sk:
                if not sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK):
                    continue  # not corked yet (TLS handshake, say): look again
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            self.done = True
            self.note = ""
            return True
        return False

