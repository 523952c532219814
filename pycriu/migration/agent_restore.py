"""The agent's restore of one session: what a ``restore`` request must satisfy, the waits that
come before CRIU may read the images (the dump's page server done, the lazy-pages daemon up),
CRIU's restore itself with every task left stopped, and the reply's timings. The stopped tree
is then the session's :class:`~.agent_restored.RestoredTree` until the commit."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _pids
from ..criu import Criu
from ..enums import LogLevel
from ..errors import CriuError
from ..options import RestoreOptions
from ..results import RestoreResult
from .agent_config import RESTORE_FLAGS
from .agent_lazy import LazySupervisor
from .agent_pages import PageServers
from .agent_restored import RestoredTree, TreeKilled
from .errors import AgentError, ProtocolError
from .images import stopped_tasks
from .protocol import finite

if TYPE_CHECKING:
    from .containers import AcceptedContainer

__all__ = ["SessionRestore"]

log = logging.getLogger("pycriu.agent")


@dataclass
class SessionRestore:
    """What a session's restore works with (the session's own parts, not copies)."""

    session: str
    criu: Criu
    work: Path
    log_level: LogLevel
    same_host: bool
    lazy_supported: bool
    pages: PageServers
    lazy: LazySupervisor
    tree: RestoredTree
    container: AcceptedContainer | None

    def run(self, msg: dict[str, Any], name: str, images: Path) -> dict[str, Any]:
        """Restore the images in ``images`` (directory ``name``) as ``msg`` asks and return the
        ``restored`` reply. The tree is left stopped and held by :attr:`tree`; on any error
        nothing of it runs."""
        flags = msg["flags"]
        for key, value in flags.items():
            if key not in RESTORE_FLAGS or not isinstance(value, bool):
                raise ProtocolError(f"restore flag {key!r} is not allowed")
        if not (images / "inventory.img").exists() or not (images / "pstree.img").exists():
            raise ProtocolError("restore requested before the images were sent")
        lazy = msg["lazy"]
        address = self.pages.source_server(msg["page_server"]) if msg["page_server"] is not None else None
        if lazy and not self.lazy_supported:
            raise AgentError("lazy pages are not supported on this host", code="unsupported")
        if address is not None and not lazy:
            raise ProtocolError("a page server to read from only makes sense with lazy=true")
        t_request = time.monotonic()
        # page-server flow: every page must be in before the restore reads them
        ps_wait = time.monotonic() - t_request if self.pages.take(name) else 0.0
        lazy_seconds = None
        if lazy:
            t0 = time.monotonic()
            self.lazy.ensure(images, name, address, self.pages.tls_options(bool(msg.get("tls"))))
            lazy_seconds = time.monotonic() - t0
        try:  # CRIU's leave_stopped stops every task; the commit resumes all but these
            self.tree.keep_stopped = stopped_tasks(images)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"the images sent cannot be read: {exc}") from None
        times: dict[str, float] = {}
        t_restore = time.monotonic()
        result = self._restore(images, lazy, flags, times)
        now = time.monotonic()
        try:
            self.tree.restored(result.pid, daemon_failed=self.lazy.failed_locked)
        except TreeKilled as exc:  # the daemon died while the restore finished: the tree had holes
            raise AgentError(str(exc), code="lazy-pages-failed") from None
        log.info("%s: restored pid %d (lazy=%s)", self.session, result.pid, lazy)
        marks = {action: finite(t - t_restore) for action, t in times.items()}
        return {"type": "restored", "pid": result.pid, "resumed_ago": finite(now - times.get("post-resume", now)),
                "restore_seconds": finite(now - t_restore), "lazy_daemon_seconds": lazy_seconds, "criu_marks": marks,
                "stats": result.stats.to_dict() if result.stats else None, "page_server_wait": finite(ps_wait)}

    def _restore(self, images: Path, lazy: bool, flags: dict[str, Any], times: dict[str, float]) -> RestoreResult:
        """CRIU's restore (through the runtime for a container), every task left stopped."""

        def notify(action: str, pid: int) -> None:
            times[action] = time.monotonic()
            if pid > 0:  # setup-namespaces: the first to name the tree
                self.tree.hold(pid)

        def restore() -> RestoreResult:
            if self.container is not None:
                return self.container.restore(self.criu, images=images, work=self.work, lazy=lazy, notify=notify,
                                              flags=flags, log_level=self.log_level)
            return self.criu.restore(RestoreOptions(images_dir=images, work_dir=self.work, log_file="restore.log",
                                                    log_level=self.log_level, lazy_pages=True if lazy else None,
                                                    leave_stopped=True, notify=notify, **flags))

        try:
            # on the source's host, a PID the tree takes back may be taken for a moment by nothing
            # visible: Criu.restore tries again itself; a runtime's restore is tried again here
            # (not a lazy one: its daemon is already attached to the first attempt)
            retry = self.container is not None and self.same_host and not lazy
            return _pids.retry_pid_clash(restore, log=log) if retry else restore()
        except CriuError as exc:
            self.lazy.stop()
            raise AgentError(exc.message + (f": {exc.criu_message}" if exc.criu_message else ""),
                             code="restore-failed") from None
        except KeyboardInterrupt as exc:  # SIGTERM/Ctrl-C held back until CRIU answered
            restored = getattr(exc, "result", None)
            if restored is not None:
                self.tree.restored(restored.pid)  # never committed: the teardown kills it
            raise
