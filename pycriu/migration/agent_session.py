"""One agent session: a migration from ``hello`` to ``bye`` over one channel (dispatch by state,
the session's directories, page servers, the lazy-pages daemon, restore, commit and abort, and a
teardown that runs on every path). :mod:`.agent` is the agent's command line; :mod:`.agent_server`
serves sessions over stdio or TCP."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._threads import Worker, spawn
from ..daemons import LazyPages, PageServer
from ..errors import CriuError, InvalidOptionError, KernelUnsupportedError
from ..options import LazyPagesOptions, PageServerAddress, PageServerOptions, RestoreOptions
from . import checks, containers, pagetls, preflight
from .agent_config import RESTORE_FLAGS, AgentConfig
from .containers import AcceptedContainer
from .errors import AgentError, ProtocolError, TransportError
from .guard import Guard
from .images import dir_usage, memory_dir
from .modes import FLOWS, choose_mode
from .procs import kill_tree, resume_tree
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
from .uncork import Uncork

__all__ = ["AgentSession"]

log = logging.getLogger("pycriu.agent")


@dataclass
class _EarlyLazy:
    """A lazy-pages daemon started before the restore asked for it."""

    dir: str
    address: PageServerAddress
    tls: bool
    started: Future[None]  # raises the AgentError of a failed start


class AgentSession:
    """One migration, from ``hello`` to ``bye``, over one :class:`Channel`."""

    def __init__(self, channel: Channel, config: AgentConfig, *, data_address: str,
                 peer_address: str | None) -> None:
        self.channel = channel
        self.config = config
        self.data_address = config.data_address or data_address
        self.peer_address = peer_address
        self.name = "s-" + secrets.token_hex(4)
        self.dir: Path | None = None
        self._dir_fd: int | None = None
        self._dir_fds: dict[str, int] = {}
        self._memory_dir: Path | None = None  # the images directory, when it is in memory
        self.limits = Limits(max_file_size=config.max_file_size, max_total_bytes=config.max_session_bytes,
                             max_files=config.max_files)
        self.state = "new"
        self.page_servers: dict[str, PageServer] = {}
        self.lazy: LazyPages | None = None
        self._uncork: Uncork | None = None
        self._prestart: Future[None] | None = None
        self._lazy_early: _EarlyLazy | None = None
        self._lazy_done = threading.Event()
        self._lazy_status: int | None = None
        self._lock = threading.Lock()
        self.restored_pid: int | None = None
        self.committed = False
        self.killed: int | None = None
        self.failed = False
        self.guard: Guard | None = None
        self.page_tls: pagetls.PageTLS | None = None
        self.container: AcceptedContainer | None = None  # a container migration (containers.py)

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
            self.failed = not self.committed
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
        with self._lock:
            if self.restored_pid is not None and not self.committed and self.killed is None:
                log.warning("%s: restored tree %d was not committed: killing it", self.name, self.restored_pid)
                self.killed = kill_tree(self.restored_pid)
            if self.container is not None and not self.committed:
                self.container.discard()  # the runtime forgets what it never ran
        if self.guard is not None:
            self.guard.stop()  # it kills what it still holds (a tree we could not kill), then exits
        for ps in self.page_servers.values():
            ps.stop(grace=1.0)
        self.page_servers.clear()
        if self._lazy_early is not None:
            wait([self._lazy_early.started])
        if self.lazy is not None:
            if self.committed and self.killed is None and self.lazy.running:
                # The tree runs on pages it has not received yet: never cut its supply.
                log.info("%s: waiting for the lazy-pages daemon to finish", self.name)
                self._lazy_done.wait(self.config.lazy_timeout)
            self._stop_lazy()
        if self._uncork is not None:
            self._uncork.stop()
        for fd in [*self._dir_fds.values(), *([self._dir_fd] if self._dir_fd is not None else [])]:
            os.close(fd)
        self._dir_fds.clear()
        self._dir_fd = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self._prestart is not None:
            wait([self._prestart])
        if self.config._criu is not None:  # noqa: SLF001 - ours
            self.config._criu.discard_prestarted()  # noqa: SLF001
        self.channel.close()
        if self._memory_dir is not None:
            shutil.rmtree(self._memory_dir, ignore_errors=True)
        if self.dir is not None and self.dir.exists():
            if self.failed and _criu_logs(self.dir / "work"):
                for sub in self.dir.iterdir():
                    if sub.name != "work":
                        shutil.rmtree(sub, ignore_errors=True)
                log.warning("%s: session failed; CRIU logs kept in %s", self.name, self.dir / "work")
                _prune_kept(self.config.root, KEEP_FAILED)
            else:  # done, or refused before CRIU ran: nothing worth keeping (and no disk to fill)
                shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_lazy(self) -> None:
        if self._lazy_early is not None:
            wait([self._lazy_early.started])  # a daemon still starting is stopped once it has started
        with self._lock:
            lazy, self.lazy = self.lazy, None
        if lazy is not None:
            lazy.stop(grace=1.0)
            with self._lock:
                if self._lazy_status is None:
                    self._lazy_status = -1
            self._lazy_done.set()

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
        root = self.config.root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = root / self.name
        self.dir.mkdir(mode=0o700)
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        (self.dir / "work").mkdir(mode=0o700)
        self.guard = Guard(self.dir / "work" / "guard.log")
        # the source names the mode it was asked for; "auto" is resolved here as the source will
        try:
            mode, _ = choose_mode(msg.get("mode", ""), msg["features"]["lazy_pages"], msg["features"]["mem_track"],
                                  local["features"]["lazy_pages"], local["features"]["mem_track"])
        except KernelUnsupportedError:
            mode = msg.get("mode", "")  # the source refuses it after this hello
        flow = FLOWS.get(mode)  # the flow's own description says where its images belong
        memory = memory_dir() if self.config.memory_images and flow and flow.destination_images_in_memory else None
        if memory is not None:
            self._memory_dir = Path(tempfile.mkdtemp(prefix=f"pycriu-agent-{self.name}-", dir=memory))
            self.guard.remove_at_exit(self._memory_dir)  # RAM: never left behind, even if this agent dies
            self._dir_fds["images"] = os.open(self._memory_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                              | os.O_CLOEXEC)
        self._subdir("images")
        if self.config.same_host:  # whole images may come by hard link into this directory
            reply["link_dev"] = os.fstat(self._subdir("images")).st_dev
        if msg.get("page_tls"):  # this session's key for CRIU's page connections (pagetls.py)
            tls_dir = self.dir / "tls"
            tls_dir.mkdir(mode=0o700)
            reply["tls_csr"] = pagetls.new_request(tls_dir)
        self.state = "ready"
        log.info("%s: session for a %s migration from %s", self.name, msg.get("mode", "?"), self.peer_address)
        self.channel.send(reply)
        # the restore's worker, started now rather than inside the downtime, and beside this
        # loop: the source's next message (a ping that measures the round trip) must not wait
        self._prestart = spawn(self._prestart_worker, name=f"{self.name}-prestart")

    def _prestart_worker(self) -> None:
        try:
            self.config.criu().prestart()
        except CriuError:
            pass  # the restore starts its own (and reports what is wrong)

    def _page_tls(self, msg: dict[str, Any]) -> None:
        """The certificate the source issued for this session's key, and its one-migration CA."""
        assert self.dir is not None
        if self.page_tls is not None or not (self.dir / "tls" / "key.pem").exists():
            raise ProtocolError("page-tls without a certificate request, or twice")
        self.page_tls = pagetls.install(self.dir / "tls", msg["cert"], msg["ca"])
        self.channel.send({"type": "page-tls-ok"})

    def _ping(self, msg: dict[str, Any]) -> None:
        self.channel.send({"type": "pong", "t": msg["t"]})

    def _preflight(self, msg: dict[str, Any]) -> None:
        """What the source's live tree needs from this host, checked before it freezes
        (:mod:`.preflight`)."""
        found = preflight.problems(msg, same_host=self.config.same_host)
        if msg.get("cpuinfo") is not None and not self.config.same_host:
            cpu = preflight.cpu_problem(self.config.criu().binary, msg["cpuinfo"], self._path_work())
            if cpu is not None:
                found.append(cpu)
        self.channel.send({"type": "preflight-ok", "problems": found})

    def _subdir(self, name: str) -> int:
        name = check_dir_name(name)
        fd = self._dir_fds.get(name)
        if fd is None:
            assert self._dir_fd is not None
            try:
                os.mkdir(name, 0o700, dir_fd=self._dir_fd)
            except FileExistsError:
                pass
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
            self._dir_fds[name] = fd
        return fd

    def _path(self, name: str) -> Path:
        assert self.dir is not None
        self._subdir(name)
        if name == "images" and self._memory_dir is not None:
            return self._memory_dir
        return self.dir / name

    def _link_parent(self, name: str, parent: str | None) -> None:
        if parent is None:
            return
        parent = check_dir_name(parent)
        if parent == name or parent not in self._dir_fds or not parent.startswith("pre-"):
            raise ProtocolError(f"parent {parent!r} is not an earlier pre-dump iteration")
        os.symlink(f"../{parent}", "parent", dir_fd=self._dir_fds[name])  # ours, never the peer's

    def _prepare_dir(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        self._subdir(name)
        self._link_parent(name, msg.get("parent"))
        self.channel.send({"type": "dir-ready", "dir": name})

    def _page_server(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        if name in self.page_servers:
            raise ProtocolError(f"a page server for {name!r} was already started")
        images = self._path(name)
        self._link_parent(name, msg.get("parent"))
        opts = PageServerOptions(images_dir=images, work_dir=self._path_work(), address=self.data_address, port=0,
                                 log_file=f"page-server-{name}.log", **self._tls_kwargs(msg))
        ps = self.config.criu().page_server(opts)
        try:
            ps.start()
        except CriuError as exc:
            raise AgentError(f"page server failed to start: {exc.message} ({exc.criu_message})",
                             code="page-server-failed") from None
        self.page_servers[name] = ps
        self.channel.send({"type": "page-server", "dir": name, "address": self.data_address, "port": ps.port})

    def _path_work(self) -> Path:
        assert self.dir is not None
        return self.dir / "work"

    def _tls_kwargs(self, msg: dict[str, Any]) -> dict[str, Any]:
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

    def _check_page_server_address(self, address: str) -> None:
        """The source's page server must be on the source: the peer's own address (any loopback
        address for a peer on this host), or one the agent was told to accept. Otherwise a peer
        could make this root daemon connect anywhere."""
        allowed = set(self.config.page_server_addresses)
        if self.peer_address is not None:
            allowed.add(self.peer_address)
        try:
            loopback = ipaddress.ip_address(address).is_loopback
            peer_loopback = self.peer_address is not None and ipaddress.ip_address(self.peer_address).is_loopback
        except ValueError:
            loopback = peer_loopback = False
        if address not in allowed and not (loopback and peer_loopback):
            raise ProtocolError(f"the source's page server address {address!r} is not the source "
                                f"({self.peer_address}); start the agent with --page-server-from {address} "
                                "to accept it")

    def _file(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        receive_file(self.channel, msg, self._subdir(name), self.limits, timeout=self.config.idle_timeout)

    def _file_link(self, msg: dict[str, Any]) -> None:
        if not self.config.same_host:
            raise ProtocolError("file-link is accepted only by an agent on the source's host (--same-host)")
        accept_link(msg, self._subdir(check_dir_name(msg["dir"])), self.limits)

    def _files_done(self, msg: dict[str, Any]) -> None:
        count, total = self.limits.received_files, self.limits.received_bytes + self.limits.linked_bytes
        self.channel.send({"type": "files-ok", "count": count, "bytes": total})
        # counters are per batch; the session's allowance shrinks by what the batch used
        self.limits.received_files = 0
        self.limits.received_bytes = 0
        self.limits.max_total_bytes -= total
        self.limits.max_files -= count

    def _restore(self, msg: dict[str, Any]) -> None:
        name = check_dir_name(msg["dir"])
        images = self._path(name)
        flags = msg["flags"]
        for key, value in flags.items():
            if key not in RESTORE_FLAGS or not isinstance(value, bool):
                raise ProtocolError(f"restore flag {key!r} is not allowed")
        if not (images / "inventory.img").exists() or not (images / "pstree.img").exists():
            raise ProtocolError("restore requested before the images were sent")
        if self.channel.peer_gone():
            raise TransportError("the source went away before the restore started")
        lazy = msg["lazy"]
        source_ps = msg["page_server"]
        if source_ps is not None:
            self._check_page_server_address(source_ps["address"])
        if lazy and not self.config.local_info()["features"]["lazy_pages"]:
            raise AgentError("lazy pages are not supported on this host", code="unsupported")
        if source_ps is not None and not lazy:
            raise ProtocolError("a page server to read from only makes sense with lazy=true")
        t_request = time.monotonic()
        ps_wait = 0.0
        ps = self.page_servers.pop(name, None)
        if ps is not None:  # page-server flow: every page must be in before the restore reads them
            try:
                ps.wait(timeout=60)
            except (CriuError, TimeoutError) as exc:
                ps.stop()
                self.state = "failed"
                raise AgentError(f"the page server did not receive the dump: {exc}",
                                 code="page-server-failed") from None
            ps_wait = time.monotonic() - t_request
        work = self._path_work()
        criu = self.config.criu()
        lazy_seconds = None
        if lazy:
            t0 = time.monotonic()
            address = None
            if source_ps is not None:
                address = PageServerAddress(source_ps["address"], source_ps["port"])
            early = self._lazy_early
            if early is not None:  # started when the daemon's images arrived (``lazy-pages``)
                if early.dir != name or early.address != address or early.tls != bool(msg.get("tls")):
                    raise ProtocolError("restore asks for another lazy-pages daemon than the one started")
                if early.started.exception() is not None:
                    self.state = "failed"
                    early.started.result()
            else:
                try:
                    self._launch_lazy(images, address, msg)
                except AgentError:
                    self.state = "failed"
                    raise
            lazy_seconds = time.monotonic() - t0
        times: dict[str, float] = {}

        def notify(action: str, pid: int) -> None:
            times[action] = time.monotonic()
            if pid > 0 and self.guard is not None:  # setup-namespaces: the first to name the tree
                self.guard.hold(pid)

        t_restore = time.monotonic()
        try:
            if self.container is not None:
                result = self.container.restore(criu, images=images, work=work, lazy=lazy, notify=notify, flags=flags,
                                                log_level=self.config.log_level)
            else:
                result = criu.restore(RestoreOptions(images_dir=images, work_dir=work, log_file="restore.log",
                                                     log_level=self.config.log_level,
                                                     lazy_pages=True if lazy else None, leave_stopped=True,
                                                     notify=notify, **flags))
        except CriuError as exc:
            self._stop_lazy()
            self.state = "failed"
            raise AgentError(exc.message + (f": {exc.criu_message}" if exc.criu_message else ""),
                             code="restore-failed") from None
        except KeyboardInterrupt as exc:  # SIGTERM/Ctrl-C held back until CRIU answered
            restored = getattr(exc, "result", None)
            if restored is not None:
                with self._lock:
                    self.restored_pid = restored.pid  # never committed: cleanup kills it
            raise
        now = time.monotonic()
        with self._lock:
            self.restored_pid = result.pid
            if self.guard is not None:
                self.guard.hold(result.pid)
            lazy_failed = self._lazy_status not in (None, 0)
        if lazy_failed:  # the daemon died while the restore finished: the tree has holes
            self.killed = kill_tree(result.pid)
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

    def _launch_lazy(self, images: Path, address: PageServerAddress | None, msg: dict[str, Any]) -> None:
        """Start ``criu lazy-pages`` over ``images`` (it reads inventory.img and pstree.img now,
        the rest when the restore hands it the tasks) and watch it."""
        try:
            # LazyPages directly: lazy pages support was checked with this session's hello
            lazy = LazyPages(LazyPagesOptions(images_dir=images, work_dir=self._path_work(), page_server=address,
                                              **self._tls_kwargs(msg)), binary=self.config.criu().binary)
            with self._lock:
                self.lazy = lazy
            lazy.start()
        except (CriuError, InvalidOptionError) as exc:
            with self._lock:
                self.lazy = None
            raise AgentError(f"the lazy-pages daemon failed to start: {exc.message} ({exc.criu_message})",
                             code="lazy-pages-failed") from None
        if address is not None:
            # CRIU 4.2's daemon sends its last command from a corked socket (200 ms more at the
            # end): uncorked from the commit on, once the watcher no longer competes with CRIU
            self._uncork = Uncork(address.port)
        Worker(self._watch_lazy, lazy, name=f"{self.name}-lazy").start()  # nobody waits: its errors are printed

    def _lazy_pages(self, msg: dict[str, Any]) -> None:
        """Start the lazy-pages daemon now, in the background, while the other images arrive:
        its start-up then overlaps the transfer instead of adding to the downtime. No reply; a
        failure is reported by the ``restore`` that needs the daemon."""
        name = check_dir_name(msg["dir"])
        if self._lazy_early is not None or self.lazy is not None:
            raise ProtocolError("a lazy-pages daemon was already started in this session")
        if not self.config.local_info()["features"]["lazy_pages"]:
            raise AgentError("lazy pages are not supported on this host", code="unsupported")
        images = self._path(name)
        if not (images / "inventory.img").exists() or not (images / "pstree.img").exists():
            raise ProtocolError("lazy-pages requested before inventory.img and pstree.img were sent")
        ps = msg["page_server"]
        self._check_page_server_address(ps["address"])
        address = PageServerAddress(ps["address"], ps["port"])
        self._tls_kwargs(msg)  # refuse TLS without a certificate now

        def start() -> None:
            try:
                self._launch_lazy(images, address, msg)
            except AgentError:
                raise
            except BaseException as exc:  # reported by the restore
                raise AgentError(f"the lazy-pages daemon failed to start: {exc!r}", code="lazy-pages-failed") from exc

        self._lazy_early = _EarlyLazy(name, address, bool(msg.get("tls")),
                                      spawn(start, name=f"{self.name}-lazy-start"))

    def _watch_lazy(self, daemon: LazyPages) -> None:
        proc = daemon._proc  # noqa: SLF001 - the daemon object is ours
        if proc is None:
            return
        status = proc.wait()
        if self._uncork is not None:
            self._uncork.stop()
            if not self._uncork.done:
                log.info("%s: %s: the end of the lazy transfer may have waited 200 ms", self.name,
                         self._uncork.note)
        with self._lock:
            self._lazy_status = status
            if status != 0 and self.restored_pid is not None and self.killed is None:
                # The kernel resolves the remaining faults with zero pages once the daemon is gone:
                # the tree must not run on.
                log.error("%s: lazy-pages daemon failed (status %d): killing restored tree %d",
                          self.name, status, self.restored_pid)
                self.killed = kill_tree(self.restored_pid)
        self._lazy_done.set()

    def _commit(self, msg: dict[str, Any]) -> None:
        """The source gives the process up: resume the restored tree (CRIU left every task
        stopped) and acknowledge, with how long ago the tree was resumed."""
        assert self.restored_pid is not None
        with self._lock:
            if self.killed is not None:
                raise AgentError("the restored tree was already killed (lazy-pages daemon failed)",
                                 code="lazy-pages-failed")
            self.committed = True
            if self.guard is not None:
                self.guard.release()  # before the resume: the guard never kills a running tree
            t_resume = time.monotonic()
            resume_tree(self.restored_pid)
        self.state = "committed"
        log.info("%s: committed: restored tree %d resumed", self.name, self.restored_pid)
        self.channel.send({"type": "committed", "pid": self.restored_pid,
                           "resumed_ago": finite(time.monotonic() - t_resume)})
        if self._uncork is not None:
            self._uncork.start()

    def _abort(self, msg: dict[str, Any]) -> bool:
        log.warning("%s: source aborted: %s", self.name, msg["reason"][:200])
        with self._lock:
            if self.restored_pid is not None and not self.committed and self.killed is None:
                self.killed = kill_tree(self.restored_pid)
        self._stop_lazy()
        self.failed = True
        self.channel.send({"type": "aborted", "killed": self.killed})
        self.state = "aborted"
        return True

    def _lazy_wait(self, msg: dict[str, Any]) -> None:
        t0 = time.monotonic()
        if self.lazy is None:
            raise ProtocolError("no lazy restore in this session")
        timeout = min(float(msg["timeout"]), self.config.lazy_timeout)
        finished = self._lazy_done.wait(timeout)
        error = None
        with self._lock:
            status = self._lazy_status
        if not finished:
            error = f"lazy pages still missing after {timeout:.0f} s"
            with self._lock:
                if self.restored_pid is not None and self.killed is None:
                    self.killed = kill_tree(self.restored_pid)
            self._stop_lazy()
        elif status != 0:
            error = f"the lazy-pages daemon failed (exit status {status}); the restored tree was killed"
        ok = finished and status == 0
        if not ok:
            self.failed = True
        uncork = self._uncork
        self.channel.send({"type": "lazy-done", "ok": ok, "status": status, "error": error, "killed": self.killed,
                           "seconds": finite(time.monotonic() - t0), "pages": None,
                           "uncork": None if uncork is None or uncork.done else uncork.note})
        self.state = "done" if ok else "failed"

    def _logs(self, msg: dict[str, Any]) -> None:
        work = self._path_work()
        files = [(p.name, p, None) for p in sorted(work.iterdir())
                 if LOG_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, "images", files, pattern=LOG_NAME)

    def _page_images(self, msg: dict[str, Any]) -> None:
        """Hand the source back the page images its dump sent to this session's page server (by
        hard link on this host's filesystem, else as data): on one host, with the source ended
        by its dump, they complete its own images, its rollback until the commit."""
        name = check_dir_name(msg["dir"])
        ps = self.page_servers.get(name)
        if ps is None:
            raise ProtocolError(f"no page server received pages into {name!r} in this session")
        try:
            ps.wait(timeout=60)
        except (CriuError, TimeoutError) as exc:
            raise AgentError(f"the page server did not receive the dump: {exc}", code="page-server-failed") from None
        images = self._path(name)
        files = [(p.name, p, None) for p in sorted(images.iterdir())
                 if PAGE_IMAGE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files, pattern=PAGE_IMAGE, link=self.config.same_host)

    def _pagemaps(self, msg: dict[str, Any]) -> None:
        """Send the pagemap images of a pre-dump iteration once its page server has written them
        (only the index of the pages: the pages stay here)."""
        name = check_dir_name(msg["dir"])
        ps = self.page_servers.get(name)
        if not name.startswith("pre-") or ps is None:
            raise ProtocolError(f"pagemaps of {name!r}: no pre-dump page server was started for it")
        try:
            ps.wait(timeout=60)  # CRIU writes the pagemap when the pre-dump's connection ends
        except (CriuError, TimeoutError) as exc:
            raise AgentError(f"the page server of {name} did not receive the pre-dump: {exc}",
                             code="page-server-failed") from None
        images = self._path(name)
        files = [(p.name, p, None) for p in sorted(images.glob("pagemap*.img")) if p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files)

    def _bye(self, msg: dict[str, Any]) -> bool:
        assert self.dir is not None
        # what this side wrote: files the source handed over by hard link were written there
        usage = dir_usage(self.dir, skip=self.limits.linked)
        memory = dir_usage(self._memory_dir, skip=self.limits.linked) if self._memory_dir is not None else None
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


#: Failed sessions whose CRIU logs are kept for the operator; older ones are removed.
KEEP_FAILED = 16


def _criu_logs(work: Path) -> list[Path]:
    """The CRIU logs a session's work directory holds (the guard's own log does not count)."""
    try:
        return [p for p in work.iterdir() if p.suffix == ".log" and p.name != "guard.log"]
    except OSError:
        return []


def _prune_kept(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` failed sessions' directories under ``root``, remove the rest."""
    try:
        kept = sorted((p for p in root.iterdir() if p.name.startswith("s-") and p.is_dir()),
                      key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in kept[:-keep] if len(kept) > keep else []:
        shutil.rmtree(old, ignore_errors=True)


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
