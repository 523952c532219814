"""One agent session: a migration from ``hello`` to ``bye`` over one channel. This file holds the
dispatch by state, the handlers and the teardown (one ExitStack, run on every path); the jobs the
handlers hand off have their own files: the session's directory (:mod:`.agent_sandbox`), its
files (:mod:`.agent_files`), its page connections (:mod:`.agent_pages`), the restore
(:mod:`.agent_restore`), the lazy-pages daemon (:mod:`.agent_lazy`) and the restored tree's fate
(:mod:`.agent_restored`). :mod:`.agent` is the
agent's command line; :mod:`.agent_server` serves sessions over stdio or TCP."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import time
from concurrent.futures import Future, wait
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .. import breakpoints
from .._threads import spawn
from ..errors import CriuError, KernelUnsupportedError
from . import checks, pagetls, preflight, procs
from .agent_config import AgentConfig
from .agent_files import SessionFiles
from .agent_lazy import LazySupervisor
from .agent_pages import PageServers
from .agent_restore import SessionRestore
from .agent_restored import RestoredTree, TreeKilled
from .agent_sandbox import SessionDir
from .errors import AgentError, ProtocolError, TransportError
from .guard import Guard
from .images import memory_dir
from .modes import FLOWS, choose_mode
from .protocol import PROTOCOL_VERSION, Channel, Limits, check_dir_name, finite

if TYPE_CHECKING:
    from .containers import AcceptedContainer

__all__ = ["AgentSession"]

log = logging.getLogger("pycriu.agent")


class AgentSession:
    """One migration, from ``hello`` to ``bye``, over one :class:`Channel`."""

    def __init__(self, channel: Channel, config: AgentConfig, *, data_address: str,
                 peer_address: str | None) -> None:
        self.channel = channel
        self.config = config
        self.data_address = config.data_address or data_address
        self.peer_address = peer_address
        self.name = "s-" + secrets.token_hex(4)
        self.sandbox = SessionDir(config.root, self.name)
        limits = Limits(max_file_size=config.max_file_size, max_total_bytes=config.max_session_bytes,
                        max_files=config.max_files)
        self.limits = limits
        self.state = "new"
        self.pages = PageServers(self.data_address, peer=peer_address, allowed_sources=config.page_server_addresses,
                                 agent_tls=config.tls)
        self.files = SessionFiles(channel, self.sandbox, self.pages, limits, same_host=config.same_host,
                                  timeout=config.idle_timeout)
        self.tree = RestoredTree()
        self.lazy: LazySupervisor | None = None  # made with the session's directory
        self.failed = False
        self.guard: Guard | None = None
        self.container: AcceptedContainer | None = None  # a container migration (containers.py)
        self._prestart: Future[None] | None = None
        self._warm = breakpoints.Warm()  # the kernel's perf hooks on for the restore's breakpoints
        # The teardown, in the order it runs: the uncommitted tree dies first, the session's
        # files go last, and every step runs even when one before it failed.
        steps = (self._kill_uncommitted, self._stop_guard, self.pages.stop, self._close_lazy, self.sandbox.close,
                 self._close_guard, self._stop_prestart, self._warm.close, self.channel.close, self._remove_files)
        self._teardown = ExitStack()
        for step in reversed(steps):  # an ExitStack runs its callbacks last in, first out
            self._teardown.callback(step)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> bool:
        """Serve the session; return True when it ended with ``bye`` after a commit or cleanly."""
        ok = False
        try:
            ok = self._loop()
        except (ProtocolError, AgentError) as exc:
            self.failed = True
            log.warning("%s: refused: %s", self.name, exc.message)
            self._send_error("refused" if isinstance(exc, ProtocolError) else exc.code, exc.message)
        except TransportError as exc:
            self.failed = not self.tree.committed
            log.warning("%s: connection lost: %s", self.name, exc.message)
        except BaseException as exc:
            self.failed = True
            log.error("%s: agent error: %r", self.name, exc)
            self._send_error("internal", f"agent error: {exc!r}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self.cleanup()
        return ok

    def _send_error(self, code: str, message: str) -> None:
        try:
            self.channel.send({"type": "error", "code": code, "message": message[:4000]})
        except (TransportError, ProtocolError):
            pass

    def cleanup(self) -> None:
        """Kill an uncommitted restored tree, stop daemons, remove the session directory."""
        self._teardown.close()

    # the teardown's own steps

    def _kill_uncommitted(self) -> None:
        if self.tree.session_ended():
            log.warning("%s: restored tree %d was not committed: killed it", self.name, self.tree.pid)
        if self.container is not None and not self.tree.committed:
            self.container.discard()  # the runtime forgets what it never ran

    def _stop_guard(self) -> None:
        if self.guard is not None:
            self.guard.stop()  # it kills what it still holds (a tree we could not kill), then exits

    def _close_lazy(self) -> None:
        if self.lazy is not None:
            self.lazy.close(self.config.lazy_timeout)

    def _close_guard(self) -> None:
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.close()

    def _stop_prestart(self) -> None:
        if self._prestart is not None:
            wait([self._prestart])
        if self.config._criu is not None:  # noqa: SLF001 - ours
            self.config._criu.discard_prestarted()  # noqa: SLF001

    def _remove_files(self) -> None:
        self.sandbox.remove(failed=self.failed)

    # -- the message loop ------------------------------------------------------------------------

    def _timeout(self) -> float:
        return self.config.commit_timeout if self.state == "restored" else self.config.idle_timeout

    def _loop(self) -> bool:
        while True:
            msg = self.channel.recv(timeout=self._timeout())
            kind = msg["type"]
            handler = self._HANDLERS.get(kind)
            allowed = self._ALLOWED.get(self.state, frozenset())
            if handler is None or kind not in allowed:
                raise ProtocolError(f"message {kind!r} is not allowed now (session state {self.state!r})")
            if handler(self, msg) is False:
                return True

    # -- handlers --------------------------------------------------------------------------------

    def _hello(self, msg: dict[str, Any]) -> None:
        if msg["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol {msg['protocol']} is not supported (this agent speaks {PROTOCOL_VERSION})")
        local = self.config.local_info(fresh=True)
        problems = _compatibility(msg, local)
        reply = {"type": "hello", "protocol": PROTOCOL_VERSION, **{k: local[k] for k in (
            "pycriu", "criu", "arch", "kernel", "features", "criu_check", "criu_error")},
            "session": self.name, "data_address": self.data_address, "peer_address": self.peer_address}
        if problems:
            raise AgentError("; ".join(problems), code="incompatible")
        if msg.get("container") is not None:  # checked before the source freezes anything
            from . import containers  # loaded for container migrations only: the agent starts faster

            cfg = self.config
            self.container = containers.accept(msg["container"], paths=cfg.container_paths,
                                               cgroups=cfg.container_cgroups, interfaces=cfg.container_interfaces,
                                               runc_binary=cfg.runc, criu_binary=cfg.criu().binary)
        self.sandbox.create()
        self.guard = self.tree.guard = Guard(self.sandbox.work / "guard.log")
        self.lazy = LazySupervisor(self.name, self.tree, binary=self.config.criu().binary, work=self.sandbox.work)
        # the source names the mode it was asked for; "auto" is resolved here as the source will
        try:
            mode, _ = choose_mode(msg.get("mode", ""), msg["features"]["lazy_pages"], msg["features"]["mem_track"],
                                  local["features"]["lazy_pages"], local["features"]["mem_track"])
        except KernelUnsupportedError:
            mode = msg.get("mode", "")  # the source refuses it after this hello
        flow = FLOWS.get(mode)  # the flow's own description says where its images belong
        memory = memory_dir() if self.config.memory_images and flow and flow.destination_images_in_memory else None
        if memory is not None:
            # RAM: never left behind, even if this agent dies
            self.guard.remove_at_exit(self.sandbox.images_in_memory(memory))
        images = self.sandbox.subdir("images")
        if self.config.same_host:  # whole images may come by hard link into this directory
            reply["link_dev"] = os.fstat(images).st_dev
            reply["pid_ns"] = procs.pid_namespace()  # a tree of this PID namespace needs its PIDs back
        if msg.get("page_tls"):  # this session's key for CRIU's page connections (pagetls.py)
            tls_dir = self.sandbox.own("tls")
            reply["tls_csr"] = pagetls.new_request(tls_dir)
        self.state = "ready"
        log.info("%s: session for a %s migration from %s", self.name, msg.get("mode", "?"), self.peer_address)
        self.channel.send(reply)
        # the restore's worker, started now rather than inside the downtime, and beside this
        # loop: the source's next message (a ping that measures the round trip) must not wait
        self._prestart = spawn(self._prestart_worker, name=f"{self.name}-prestart")
        self._warm.open_in_background()  # the switch is paid now, not by the restore's breakpoints

    def _prestart_worker(self) -> None:
        # the image reader (protobuf and CRIU's schema, 40 ms) reads the restore's statistics
        # and the stopped tasks: loaded now, not inside the downtime
        importlib.import_module("pycriu.images")
        try:
            self.config.criu().prestart()
        except CriuError:
            pass  # the restore starts its own (and reports what is wrong)

    def _page_tls(self, msg: dict[str, Any]) -> None:
        """The certificate the source issued for this session's key, and its one-migration CA."""
        tls_dir = self.sandbox.own("tls", create=False)
        if self.pages.page_tls is not None or not (tls_dir / "key.pem").exists():
            raise ProtocolError("page-tls without a certificate request, or twice")
        self.pages.page_tls = pagetls.install(tls_dir, msg["cert"], msg["ca"])
        self.channel.send({"type": "page-tls-ok"})

    def _ping(self, msg: dict[str, Any]) -> None:
        self.channel.send({"type": "pong", "t": msg["t"]})

    def _preflight(self, msg: dict[str, Any]) -> None:
        """What the source's live tree needs from this host, checked before it freezes
        (:mod:`.preflight`)."""
        found = preflight.problems(msg, same_host=self.config.same_host)
        if msg.get("cpuinfo") is not None and not self.config.same_host:
            cpu = preflight.cpu_problem(self.config.criu().binary, msg["cpuinfo"], self.sandbox.work)
            if cpu is not None:
                found.append(cpu)
        self.channel.send({"type": "preflight-ok", "problems": found})

    def _prepare_dir(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        self.sandbox.subdir(name)
        self.sandbox.link_parent(name, msg.get("parent"))
        self.channel.send({"type": "dir-ready", "dir": name})

    def _page_server(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        images = self.sandbox.subpath(name)
        self.sandbox.link_parent(name, msg.get("parent"))
        port = self.pages.start(self.config.criu(), name, images, self.sandbox.work,
                                self.pages.tls_options(bool(msg.get("tls"))))
        self.channel.send({"type": "page-server", "dir": name, "address": self.data_address, "port": port})

    def _lazy_pages(self, msg: dict[str, Any]) -> None:
        """Start the lazy-pages daemon now, in the background, while the other images arrive:
        its start-up then overlaps the transfer instead of adding to the downtime. No reply; a
        failure is reported by the ``restore`` that needs the daemon."""
        assert self.lazy is not None
        name = check_dir_name(msg["dir"])
        if self.lazy.started:
            raise ProtocolError("a lazy-pages daemon was already started in this session")
        if not self.config.local_info()["features"]["lazy_pages"]:
            raise AgentError("lazy pages are not supported on this host", code="unsupported")
        images = self.sandbox.subpath(name)
        if not (images / "inventory.img").exists() or not (images / "pstree.img").exists():
            raise ProtocolError("lazy-pages requested before inventory.img and pstree.img were sent")
        address = self.pages.source_server(msg["page_server"])
        tls = self.pages.tls_options(bool(msg.get("tls")))  # refused now, not at the restore
        self.lazy.start_early(images, name, address, tls)

    def _restore(self, msg: dict[str, Any]) -> None:
        assert self.lazy is not None
        name = check_dir_name(msg["dir"])
        if self.channel.peer_gone():
            raise TransportError("the source went away before the restore started")
        cfg = self.config
        restore = SessionRestore(self.name, cfg.criu(), self.sandbox.work, cfg.log_level, cfg.same_host,
                                 cfg.local_info()["features"]["lazy_pages"], self.pages, self.lazy, self.tree,
                                 self.container)
        reply = restore.run(msg, name, self.sandbox.subpath(name))
        self.state = "restored"
        self.channel.send(reply)

    def _commit(self, msg: dict[str, Any]) -> None:
        """The source gives the process up: resume the restored tree (CRIU left every task
        stopped) and acknowledge, with how long ago the tree was resumed."""
        try:
            t_resume = self.tree.commit()
        except TreeKilled:
            raise AgentError("the restored tree was already killed (lazy-pages daemon failed)",
                             code="lazy-pages-failed") from None
        self.state = "committed"
        log.info("%s: committed: restored tree %d resumed", self.name, self.tree.pid)
        self.channel.send({"type": "committed", "pid": self.tree.pid,
                           "resumed_ago": finite(time.monotonic() - t_resume)})
        if self.lazy is not None:
            self.lazy.committed()

    def _abort(self, msg: dict[str, Any]) -> bool:
        log.warning("%s: source aborted: %s", self.name, msg["reason"][:200])
        killed = self.tree.abort()
        if self.lazy is not None:
            self.lazy.stop()
        self.failed = True
        self.channel.send({"type": "aborted", "killed": killed})
        self.state = "aborted"
        return True

    def _lazy_wait(self, msg: dict[str, Any]) -> None:
        t0 = time.monotonic()
        if self.lazy is None:
            raise ProtocolError("no lazy restore in this session")
        timeout = min(float(msg["timeout"]), self.config.lazy_timeout)
        finished, status = self.lazy.wait(timeout)
        error = None
        if not finished:
            error = f"lazy pages still missing after {timeout:.0f} s"
            self.tree.pages_lost()
            self.lazy.stop()
        elif status != 0:
            error = f"the lazy-pages daemon failed (exit status {status}); the restored tree was killed"
        ok = finished and status == 0
        if not ok:
            self.failed = True
        self.channel.send({"type": "lazy-done", "ok": ok, "status": status, "error": error, "killed": self.tree.killed,
                           "seconds": finite(time.monotonic() - t0), "pages": None,
                           "uncork": self.lazy.uncork_note})
        self.state = "done" if ok else "failed"

    def _bye(self, msg: dict[str, Any]) -> bool:
        # what this side wrote: files the source handed over by hard link were written there
        usage, memory = self.sandbox.usage(skip=self.limits.linked)
        self.channel.send({"type": "bye", "disk": usage.to_dict(), "memory": memory.to_dict() if memory else None})
        if self.state in ("failed", "aborted"):
            self.failed = True
        return False

    _HANDLERS: dict[str, Any] = {
        "hello": _hello, "page-tls": _page_tls, "ping": _ping, "preflight": _preflight, "lazy-pages": _lazy_pages,
        "prepare-dir": _prepare_dir, "page-server": _page_server, "restore": _restore, "commit": _commit,
        "abort": _abort, "lazy-wait": _lazy_wait, "bye": _bye,
        # the session's files (agent_files.py)
        "file": lambda s, m: s.files.receive(m), "file-link": lambda s, m: s.files.link(m),
        "files-done": lambda s, m: s.files.batch_done(m), "logs": lambda s, m: s.files.logs(m),
        "page-images": lambda s, m: s.files.page_images(m), "pagemaps": lambda s, m: s.files.pagemaps(m),
    }
    _ALLOWED: dict[str, frozenset[str]] = {
        "new": frozenset({"hello"}),
        "ready": frozenset({"page-tls", "preflight",
                            "ping", "prepare-dir", "page-server", "file", "file-link", "files-done", "lazy-pages",
                            "page-images", "restore", "pagemaps",
                            "abort", "logs", "bye"}),
        "restored": frozenset({"ping", "commit", "abort"}),
        "committed": frozenset({"ping", "lazy-wait", "logs", "bye"}),
        "done": frozenset({"ping", "logs", "bye"}),
        "failed": frozenset({"ping", "logs", "bye", "abort"}),
        "aborted": frozenset({"logs", "bye"}),
    }


def _compatibility(hello: dict[str, Any], local: dict[str, Any]) -> list[str]:
    """Why this host cannot receive from the source described by ``hello`` (empty: it can)."""
    problems = []
    if not local["criu_check"]:
        problems.append(f"CRIU does not work on the destination: {local['criu_error']}")
    if hello["arch"] != local["arch"]:
        problems.append(f"architecture differs: source {hello['arch']}, destination {local['arch']}")
    older = checks.older_destination(hello["criu"], local["criu"])
    if older is not None:
        problems.append(f"{older}: its images may not restore here")
    return problems
