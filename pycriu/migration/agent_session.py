"""One agent session: a migration from ``hello`` to ``bye`` over one channel. This file holds the
dispatch by state, the handlers and the teardown (one ExitStack, run on every path); the jobs the
handlers hand off have their own files: the session's directory (:mod:`.agent_sandbox`), page
servers and the source-address policy (:mod:`.agent_pages`), the lazy-pages daemon
(:mod:`.agent_lazy`) and the restored tree's fate (:mod:`.agent_restored`). :mod:`.agent` is the
agent's command line; :mod:`.agent_server` serves sessions over stdio or TCP."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import time
from concurrent.futures import Future, wait
from contextlib import ExitStack
from typing import Any

from .._threads import spawn
from ..errors import CriuError, InvalidOptionError, KernelUnsupportedError
from ..options import PageServerAddress, RestoreOptions
from ..results import RestoreResult
from . import checks, containers, pagetls, preflight, procs
from .agent_config import RESTORE_FLAGS, AgentConfig
from .agent_lazy import LazySupervisor
from .agent_pages import PageServers, check_source_address
from .agent_restored import RestoredTree, TreeKilled
from .agent_sandbox import SessionDir
from .containers import AcceptedContainer
from .errors import AgentError, ProtocolError, TransportError
from .guard import Guard
from .images import memory_dir, stopped_tasks
from .modes import FLOWS, choose_mode
from .protocol import (
    LOG_NAME,
    PAGE_IMAGE,
    PROTOCOL_VERSION,
    Channel,
    Limits,
    accept_link,
    check_dir_name,
    finite,
    receive_file,
    send_files,
)

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
        self.limits = Limits(max_file_size=config.max_file_size, max_total_bytes=config.max_session_bytes,
                             max_files=config.max_files)
        self.state = "new"
        self.pages = PageServers(self.data_address)
        self.tree = RestoredTree()
        self.lazy: LazySupervisor | None = None  # made with the session's directory
        self.failed = False
        self.guard: Guard | None = None
        self.page_tls: pagetls.PageTLS | None = None
        self.container: AcceptedContainer | None = None  # a container migration (containers.py)
        self._prestart: Future[None] | None = None
        # The teardown, in the order it runs: the uncommitted tree dies first, the session's
        # files go last, and every step runs even when one before it failed.
        steps = (self._kill_uncommitted, self._stop_guard, self.pages.stop, self._close_lazy, self.sandbox.close,
                 self._close_guard, self._stop_prestart, self.channel.close, self._remove_files)
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
        with self.tree.lock:
            if self.tree.pid is not None and not self.tree.committed and self.tree.killed is None:
                log.warning("%s: restored tree %d was not committed: killing it", self.name, self.tree.pid)
                self.tree.kill_locked()
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
        if self.page_tls is not None or not (tls_dir / "key.pem").exists():
            raise ProtocolError("page-tls without a certificate request, or twice")
        self.page_tls = pagetls.install(tls_dir, msg["cert"], msg["ca"])
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
        if name in self.pages:
            raise ProtocolError(f"a page server for {name!r} was already started")
        images = self.sandbox.subpath(name)
        self.sandbox.link_parent(name, msg.get("parent"))
        port = self.pages.start(self.config.criu(), name, images, self.sandbox.work, self._tls_options(msg))
        self.channel.send({"type": "page-server", "dir": name, "address": self.data_address, "port": port})

    def _tls_options(self, msg: dict[str, Any]) -> dict[str, Any]:
        """CRIU's own TLS for a page connection, with this agent's certificate, when asked."""
        if not msg.get("tls"):
            return {}
        if self.page_tls is not None:
            return self.page_tls.criu_options()
        tls = self.config.tls
        if tls is None:
            raise AgentError("TLS for CRIU's page connections was requested but this agent has no certificate",
                             code="unsupported")
        return tls.criu_options()

    def _source_page_server(self, ps: dict[str, Any]) -> PageServerAddress:
        check_source_address(ps["address"], self.peer_address, self.config.page_server_addresses)
        try:
            return PageServerAddress(ps["address"], ps["port"])
        except InvalidOptionError as exc:
            raise ProtocolError(f"the source's page server: {exc.message}") from None

    def _file(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        receive_file(self.channel, msg, self.sandbox.subdir(name), self.limits, timeout=self.config.idle_timeout)

    def _file_link(self, msg: dict[str, Any]) -> None:
        if not self.config.same_host:
            raise ProtocolError("file-link is accepted only by an agent on the source's host (--same-host)")
        accept_link(msg, self.sandbox.subdir(check_dir_name(msg["dir"])), self.limits)

    def _files_done(self, msg: dict[str, Any]) -> None:
        count, total = self.limits.received_files, self.limits.received_bytes + self.limits.linked_bytes
        self.channel.send({"type": "files-ok", "count": count, "bytes": total})
        # counters are per batch; the session's allowance shrinks by what the batch used
        self.limits.received_files = 0
        self.limits.received_bytes = 0
        self.limits.max_total_bytes -= total
        self.limits.max_files -= count

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
        address = self._source_page_server(msg["page_server"])
        self.lazy.start_early(images, name, address, self._tls_options(msg))  # TLS refused now, not later

    def _restore(self, msg: dict[str, Any]) -> None:
        assert self.lazy is not None
        name = check_dir_name(msg["dir"])
        images = self.sandbox.subpath(name)
        flags = msg["flags"]
        for key, value in flags.items():
            if key not in RESTORE_FLAGS or not isinstance(value, bool):
                raise ProtocolError(f"restore flag {key!r} is not allowed")
        if not (images / "inventory.img").exists() or not (images / "pstree.img").exists():
            raise ProtocolError("restore requested before the images were sent")
        if self.channel.peer_gone():
            raise TransportError("the source went away before the restore started")
        lazy = msg["lazy"]
        address = self._source_page_server(msg["page_server"]) if msg["page_server"] is not None else None
        if lazy and not self.config.local_info()["features"]["lazy_pages"]:
            raise AgentError("lazy pages are not supported on this host", code="unsupported")
        if address is not None and not lazy:
            raise ProtocolError("a page server to read from only makes sense with lazy=true")
        t_request = time.monotonic()
        try:  # page-server flow: every page must be in before the restore reads them
            waited = self.pages.received(name, keep=False)
        except AgentError:
            self.state = "failed"
            raise
        ps_wait = time.monotonic() - t_request if waited else 0.0
        lazy_seconds = None
        if lazy:
            t0 = time.monotonic()
            try:
                self.lazy.ensure(images, name, address, self._tls_options(msg))
            except AgentError:
                self.state = "failed"
                raise
            lazy_seconds = time.monotonic() - t0
        try:  # CRIU's leave_stopped stops every task; the commit resumes all but these
            self.tree.keep_stopped = stopped_tasks(images)
        except (OSError, ValueError) as exc:
            self.state = "failed"
            raise ProtocolError(f"the images sent cannot be read: {exc}") from None
        times: dict[str, float] = {}

        def notify(action: str, pid: int) -> None:
            times[action] = time.monotonic()
            if pid > 0:  # setup-namespaces: the first to name the tree
                self.tree.hold(pid)

        criu = self.config.criu()
        work = self.sandbox.work
        t_restore = time.monotonic()
        def restore() -> RestoreResult:
            if self.container is not None:
                return self.container.restore(criu, images=images, work=work, lazy=lazy, notify=notify, flags=flags,
                                              log_level=self.config.log_level)
            return criu.restore(RestoreOptions(images_dir=images, work_dir=work, log_file="restore.log",
                                               log_level=self.config.log_level, lazy_pages=True if lazy else None,
                                               leave_stopped=True, notify=notify, **flags))

        try:
            # on the source's host, a PID the tree takes back may be held for a moment by a
            # process being created: a restore that failed at its first fork can run again (not a
            # lazy one: its daemon is already attached to the first attempt)
            result = procs.retry_pid_clash(restore, log=log) if self.config.same_host and not lazy else restore()
        except CriuError as exc:
            self.lazy.stop()
            self.state = "failed"
            raise AgentError(exc.message + (f": {exc.criu_message}" if exc.criu_message else ""),
                             code="restore-failed") from None
        except KeyboardInterrupt as exc:  # SIGTERM/Ctrl-C held back until CRIU answered
            restored = getattr(exc, "result", None)
            if restored is not None:
                self.tree.restored(restored.pid)  # never committed: the teardown kills it
            raise
        now = time.monotonic()
        with self.tree.lock:
            self.tree.pid = result.pid
            self.tree.hold(result.pid)
            if self.lazy.failed_locked():  # the daemon died while the restore finished: the tree has holes
                self.tree.kill_locked()
                self.state = "failed"
                raise AgentError("the lazy-pages daemon failed during the restore; the restored tree was killed",
                                 code="lazy-pages-failed")
        self.state = "restored"
        resumed = times.get("post-resume", now)
        log.info("%s: restored pid %d (lazy=%s)", self.name, result.pid, lazy)
        self.channel.send({"type": "restored", "pid": result.pid, "resumed_ago": finite(now - resumed),
                           "restore_seconds": finite(now - t_restore), "lazy_daemon_seconds": lazy_seconds,
                           "stats": result.stats.to_dict() if result.stats else None,
                           "page_server_wait": finite(ps_wait)})

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
        killed = self.tree.kill()
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
            self.tree.kill(committed_too=True)  # the kernel would fill the holes with zeros
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

    def _logs(self, msg: dict[str, Any]) -> None:
        work = self.sandbox.work
        files = [(p.name, p, None) for p in sorted(work.iterdir())
                 if LOG_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, "images", files, pattern=LOG_NAME)

    def _page_images(self, msg: dict[str, Any]) -> None:
        """Hand the source back the page images its dump sent to this session's page server (by
        hard link on this host's filesystem, else as data): on one host, with the source ended
        by its dump, they complete its own images, its rollback until the commit."""
        name = check_dir_name(msg["dir"])
        if not self.pages.received(name):
            raise ProtocolError(f"no page server received pages into {name!r} in this session")
        images = self.sandbox.subpath(name)
        files = [(p.name, p, None) for p in sorted(images.iterdir())
                 if PAGE_IMAGE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files, pattern=PAGE_IMAGE, link=self.config.same_host)

    def _pagemaps(self, msg: dict[str, Any]) -> None:
        """Send the pagemap images of a pre-dump iteration once its page server has written them
        (only the index of the pages: the pages stay here)."""
        name = check_dir_name(msg["dir"])
        # CRIU writes the pagemap when the pre-dump's connection ends
        if not name.startswith("pre-") or not self.pages.received(name, "the pre-dump"):
            raise ProtocolError(f"pagemaps of {name!r}: no pre-dump page server was started for it")
        images = self.sandbox.subpath(name)
        files = [(p.name, p, None) for p in sorted(images.glob("pagemap*.img")) if p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files)

    def _bye(self, msg: dict[str, Any]) -> bool:
        # what this side wrote: files the source handed over by hard link were written there
        usage, memory = self.sandbox.usage(skip=self.limits.linked)
        self.channel.send({"type": "bye", "disk": usage.to_dict(), "memory": memory.to_dict() if memory else None})
        if self.state in ("failed", "aborted"):
            self.failed = True
        return False

    _HANDLERS: dict[str, Any] = {
        "hello": _hello, "page-tls": _page_tls, "ping": _ping, "preflight": _preflight, "lazy-pages": _lazy_pages,
        "prepare-dir": _prepare_dir, "page-server": _page_server, "file": _file,
        "file-link": _file_link, "files-done": _files_done,
        "restore": _restore, "commit": _commit, "abort": _abort, "lazy-wait": _lazy_wait, "logs": _logs,
        "page-images": _page_images, "pagemaps": _pagemaps, "bye": _bye,
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
