"""Work around CRIU 4.2's 200 ms waits on its corked page-server connections.

CRIU corks its page-server connections (``TCP_CORK``) and pushes each message that needs an
answer out with ``TCP_NODELAY`` ("corked by default with sporadic NODELAY-s on urgent data"),
except the last ones, which then sit in the corked socket until the kernel's 200 ms cork timer
fires:

* a dump into a page server sends ``PS_IOV_CLOSE`` from ``disconnect_from_page_server()`` and
  waits for the answer, frozen (measured: "Disconnect from the page server" is followed 204 to
  229 ms later by "Unfreezing tasks", with libcriu and with the ``criu`` command line alike);
* at the end of a lazy migration the lazy-pages daemon sends the same ``PS_IOV_CLOSE`` from its
  corked socket, and the page server it reads from answers it from *its* corked socket (lazy
  mode corks the served connection for good): 2 x 200 ms before both sides see the end (measured:
  a 64 MiB lazy transfer done in 55 ms, its page server's "Session over" 417 ms later).

:class:`Uncork` takes the cork off one such socket from outside: it finds the connection
(sock_diag), the ``criu`` process of ours that holds it (``/proc/PID/fd``), borrows the
descriptor (``pidfd_getfd``), and once CRIU has corked it, sets ``TCP_NODELAY`` and clears
``TCP_CORK``, so that every later write leaves at once, the close command and its answer
included. The pages themselves are unaffected (large writes). Nothing is done when anything is
missing (another kernel, no permission, a CRIU that does not cork): CRIU then simply takes its
200 ms, as before.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time

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
    """While the ``with`` block runs, uncork the connection of a ``criu`` process of ours to
    ``port`` (a dump or a lazy-pages daemon reading from a page server), or with ``serving``,
    the connection that a ``criu`` page server of ours accepted on its own ``port``. ``done``
    says whether it was done; ``note`` why not."""

    def __init__(self, port: int, *, serving: bool = False) -> None:
        self.port = port
        self.serving = serving
        self.done = False
        self.note = f"CRIU's connection {'on' if serving else 'to'} port {port} was not seen"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._thread = Worker(self._watch, name=f"pycriu-uncork-{port}")

    def start(self) -> Uncork:
        """Start looking (once; not after :meth:`stop`). Never raises: callers start it on
        paths where the migration must go on (a commit); a failure is only a ``note``."""
        with self._lock:
            if not self._started and not self._stop.is_set():
                try:
                    self._thread.start()
                    self._started = True
                except RuntimeError as exc:  # no thread could be started
                    self.note = f"could not watch CRIU's connection: {exc}"
        return self

    def stop(self) -> None:
        """Stop looking and wait for the watcher. Idempotent, from any thread."""
        self._stop.set()
        with self._lock:
            started = self._started
        if started:
            self._thread.join()

    def __enter__(self) -> Uncork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        # every millisecond at first (the socket is corked right after it connects), then every
        # 20 ms: a CRIU that never corks it is watched cheaply until stop()
        t0 = time.monotonic()
        while not self._stop.wait(0.001 if time.monotonic() - t0 < 0.5 else 0.02):
            try:
                if self._try():
                    return
            except OSError as exc:
                self.note = f"could not uncork CRIU's page-server connection: {exc}"
                return

    def _try(self) -> bool:
        conns = [inode for sport, dport, inode in procs.tcp_sockets(procs.TCP_ESTABLISHED)
                 if (sport if self.serving else dport) == self.port]
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

