"""The agent's lazy-pages daemon: started early (while the other images still arrive) or by the
restore, and watched until it exits. Under a committed tree that still faults pages in, the
session's end waits for it (up to the agent's lazy timeout) before stopping it. A daemon that
dies before the last page kills the restored tree: the kernel would resolve its remaining
faults with zero pages."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._threads import Worker, spawn
from ..daemons import LazyPages
from ..errors import CriuError, InvalidOptionError
from ..options import LazyPagesOptions, PageServerAddress
from .agent_restored import RestoredTree
from .errors import AgentError, ProtocolError
from .uncork import Uncork

__all__ = ["LazySupervisor"]

log = logging.getLogger("pycriu.agent")


@dataclass(frozen=True)
class _Request:
    """What a daemon was started for: a restore must ask for the same."""

    dir: str
    address: PageServerAddress | None
    tls: bool


class LazySupervisor:
    """At most one ``criu lazy-pages`` of one session. Its exit status is kept under the
    restored tree's lock, so that the watcher and the restore agree on who kills the tree."""

    def __init__(self, session: str, tree: RestoredTree, *, binary: str, work: Path) -> None:
        self._session = session
        self._tree = tree
        self._binary = binary
        self._work = work
        self._daemon: LazyPages | None = None
        self._request: _Request | None = None
        self._early: Future[None] | None = None  # a start in the background; raises its AgentError
        self._done = threading.Event()
        self._status: int | None = None  # under tree.lock
        self._uncork: Uncork | None = None

    @property
    def started(self) -> bool:
        return self._request is not None

    @property
    def uncork_note(self) -> str | None:
        """Why the end of the transfer may have waited for CRIU's cork (None: it did not)."""
        u = self._uncork
        return None if u is None or u.done else u.note

    def failed_locked(self) -> bool:
        """The daemon exited with an error (the caller holds the tree's lock)."""
        return self._status not in (None, 0)

    # -- start -----------------------------------------------------------------------------------

    def start_early(self, images: Path, dir_name: str, address: PageServerAddress, tls: dict[str, Any]) -> None:
        """Start the daemon in the background: its start-up overlaps the rest of the transfer.
        A failure is reported by the restore that needs it (:meth:`ensure`)."""
        if self.started:
            raise ProtocolError("a lazy-pages daemon was already started in this session")
        self._request = _Request(dir_name, address, bool(tls))

        def start() -> None:
            try:
                self._launch(images, address, tls)
            except AgentError:
                raise
            except BaseException as exc:
                raise AgentError(f"the lazy-pages daemon failed to start: {exc!r}", code="lazy-pages-failed") from exc

        self._early = spawn(start, name=f"{self._session}-lazy-start")

    def ensure(self, images: Path, dir_name: str, address: PageServerAddress | None, tls: dict[str, Any]) -> None:
        """The restore needs the daemon: check the one started early is the one asked for (and
        started), or start it now. Raises the start's :class:`AgentError`."""
        request = _Request(dir_name, address, bool(tls))
        if self._early is None:
            if self.started:
                raise ProtocolError("a lazy-pages daemon was already started in this session")
            self._request = request
            self._launch(images, address, tls)
            return
        if request != self._request:
            raise ProtocolError("restore asks for another lazy-pages daemon than the one started")
        self._early.result()

    def _launch(self, images: Path, address: PageServerAddress | None, tls: dict[str, Any]) -> None:
        """Start ``criu lazy-pages`` over ``images`` (it reads inventory.img and pstree.img now,
        the rest when the restore hands it the tasks) and watch it."""
        try:
            daemon = LazyPages(LazyPagesOptions(images_dir=images, work_dir=self._work, page_server=address, **tls),
                               binary=self._binary)
            with self._tree.lock:
                self._daemon = daemon
            daemon.start()
        except (CriuError, InvalidOptionError) as exc:
            with self._tree.lock:
                self._daemon = None
            raise AgentError(f"the lazy-pages daemon failed to start: {exc.message} ({exc.criu_message})",
                             code="lazy-pages-failed") from None
        if address is not None:
            # CRIU 4.2's daemon sends its last command from a corked socket (200 ms more at the
            # end): uncorked from the commit on, once the watcher no longer competes with CRIU
            self._uncork = Uncork(address.port)
        Worker(self._watch, daemon, name=f"{self._session}-lazy").start()  # nobody waits: its errors are printed

    def _watch(self, daemon: LazyPages) -> None:
        proc = daemon._proc  # noqa: SLF001 - the daemon object is ours
        if proc is None:
            return
        status = proc.wait()
        if self._uncork is not None:
            self._uncork.stop()
            if not self._uncork.done:
                log.info("%s: %s: the end of the lazy transfer may have waited 200 ms", self._session,
                         self._uncork.note)
        with self._tree.lock:
            self._status = status
            if status != 0 and self._tree.pid is not None and self._tree.killed is None:
                log.error("%s: lazy-pages daemon failed (status %d): killing restored tree %d",
                          self._session, status, self._tree.pid)
                self._tree.pages_lost_locked()
        self._done.set()

    # -- after the commit ------------------------------------------------------------------------

    def committed(self) -> None:
        """The tree runs: take the cork off CRIU's last message from now on."""
        if self._uncork is not None:
            self._uncork.start()

    def wait(self, timeout: float) -> tuple[bool, int | None]:
        """Wait for the daemon to serve its last page: (finished, exit status)."""
        if self._daemon is None:
            raise ProtocolError("no lazy restore in this session")
        finished = self._done.wait(timeout)
        with self._tree.lock:
            return finished, self._status

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the daemon now (a daemon still starting is stopped once it has started)."""
        if self._early is not None:
            wait([self._early])
        with self._tree.lock:
            daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.stop(grace=1.0)
            with self._tree.lock:
                if self._status is None:
                    self._status = -1
            self._done.set()

    def close(self, timeout: float) -> None:
        """The session ends: under a committed, living tree, wait up to ``timeout`` for the
        daemon to finish (never cut the supply of pages the tree has not received), then stop."""
        if self._early is not None:
            wait([self._early])
        with self._tree.lock:
            daemon = self._daemon
            waits = self._tree.committed and self._tree.killed is None
        if daemon is not None and waits and daemon.running:
            log.info("%s: waiting for the lazy-pages daemon to finish", self._session)
            self._done.wait(timeout)
        self.stop()
        if self._uncork is not None:
            self._uncork.stop()
