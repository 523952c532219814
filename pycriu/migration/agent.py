"""The destination agent: ``pycriu agent`` (or ``python -m pycriu.migration.agent``).

One agent session receives a migrating process tree: it checks CRIU here, runs CRIU's page server
or lazy-pages daemon when the flow needs one, receives the non-page images into a private session
directory, restores the tree, and keeps it only once the source commits. Everything it receives
is validated (:mod:`pycriu.migration.protocol`); any violation ends the session.

Modes:

* ``--stdio``: one session over stdin/stdout (the ``local`` and ``ssh://`` transports). The
  original stdout is taken over for the protocol; anything else printing to stdout goes to stderr.
* ``--listen HOST:PORT``: sessions one after another over TCP (``tcp://``), on 127.0.0.1 unless
  told otherwise, authenticated by TLS client certificates (``--tls-cert/--tls-key/--tls-ca``)
  and/or a shared secret (``--secret-file``). Without either the agent refuses to start.

What the agent guarantees, whatever happens to the connection:

* a restored tree is held stopped (CRIU's ``leave_stopped``) and resumed (``SIGCONT`` to every
  process) only when the source commits, just before the agent acknowledges: never a second
  running copy. An agent that dies before the commit takes its tree with it: the session's guard
  (:mod:`pycriu.migration.guard`, a process of its own) kills it when the agent's pipe closes;
* a restored tree that the source has not committed is killed (the source resumes its own);
* a lazily restored tree whose lazy-pages daemon fails is killed at once (its missing pages
  would otherwise read as zeros), and the failure is reported;
* page servers, lazy-pages daemons and the session directory are removed (the logs of a failed
  session are kept and named in the agent's stderr).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._threads import Worker, spawn
from ..criu import Criu
from ..daemons import LazyPages, PageServer
from ..enums import LogLevel
from ..errors import CriuError, InvalidOptionError, KernelUnsupportedError
from ..options import LazyPagesOptions, PageServerAddress, PageServerOptions, RestoreOptions
from . import checks, pagetls, preflight
from .errors import AgentError, MigrationError, ProtocolError, TransportError
from .guard import Guard
from .images import dir_usage, memory_dir
from .modes import FLOWS, choose_mode
from .procs import kill_tree, resume_tree
from .protocol import (
    LOG_NAME,
    PROTOCOL_VERSION,
    Channel,
    Limits,
    accept_link,
    agent_authenticate,
    check_dir_name,
    finite,
    receive_file,
    send_files,
)
from .transport import PipeStream, SocketStream, TLSConfig
from .uncork import Uncork

__all__ = ["AgentConfig", "AgentSession", "serve_stdio", "serve_tcp", "main", "add_arguments", "run_from_args",
           "RESTORE_FLAGS", "kill_tree"]

log = logging.getLogger("pycriu.agent")

#: CRIU options the source may ask the restore to use (booleans only, nothing path-like).

RESTORE_FLAGS = frozenset({"tcp_established", "tcp_close", "shell_job", "ext_unix_sk", "file_locks",
                           "link_remap", "evasive_devices", "skip_file_rwx_check", "weak_sysctls"})


@dataclass
class AgentConfig:
    """How an agent runs. ``root`` holds one private directory per session; with
    ``memory_images``, the lazy flows' images (no page but CRIU's few non-lazy ones) go to a
    memory filesystem (``/dev/shm``, when it is one with room) so that no page touches a disk."""

    root: Path
    memory_images: bool = True
    #: The source runs on this host (the ``local`` transport starts its agent so): whole images
    #: may come by hard link from the source's directory (``file-link``) instead of by copy.
    same_host: bool = False
    secret: bytes | None = None
    tls: TLSConfig | None = None
    data_address: str | None = None
    #: Addresses besides the peer's own where a source's page server may be (multi-homed sources).
    page_server_addresses: tuple[str, ...] = ()
    criu_binary: str | None = None
    commit_timeout: float = 120.0
    idle_timeout: float = 600.0
    lazy_timeout: float = 3600.0
    max_file_size: int = 64 << 30
    max_session_bytes: int = 256 << 30
    max_files: int = 100_000
    log_level: LogLevel = LogLevel.INFO
    _criu: Criu | None = field(default=None, repr=False)
    _local: dict[str, Any] | None = field(default=None, repr=False)
    _probe: Future[dict[str, Any]] | None = field(default=None, repr=False)
    _probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def criu(self) -> Criu:
        if self._criu is None:
            self._criu = Criu(self.criu_binary)
        return self._criu

    def prefetch(self) -> None:
        """Start probing this host's CRIU in the background (at agent start-up, before the
        source's ``hello`` arrives, so that the checks cost the migration no extra wait)."""
        with self._probe_lock:
            if self._probe is None:
                self._local = None
                self._probe = spawn(self._probe_now, name="pycriu-agent-checks")

    def _probe_now(self) -> dict[str, Any]:
        info: dict[str, Any] = {"pycriu": __version__, "arch": platform.machine(), "kernel": platform.release(),
                                "criu": "unknown", "criu_check": False, "criu_error": None,
                                "features": {"lazy_pages": False, "mem_track": False}, "checks_cached": False,
                                "checks_seconds": 0.0}
        try:
            self._criu = Criu(self.criu_binary)  # per session: CRIU's version is asked again
            host = checks.probe(self._criu)
            info.update(criu=host.criu, criu_check=True, checks_cached=host.cached, checks_seconds=host.seconds,
                        features={"lazy_pages": host.lazy_pages, "mem_track": host.mem_track})
        except CriuError as exc:
            info["criu_error"] = str(exc).splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - reported to the source as a failed check
            info["criu_error"] = f"{type(exc).__name__}: {exc}"
        return info

    def local_info(self, *, fresh: bool = False) -> dict[str, Any]:
        """This host's CRIU version, ``criu check`` result and features (see
        :mod:`pycriu.migration.checks`: the version is asked every time, a successful check is
        cached). ``fresh``: probe again unless a prefetched result is waiting."""
        with self._probe_lock:
            probe = self._probe
            if probe is None and (fresh or self._local is None):
                self._local = None
                probe = self._probe = spawn(self._probe_now, name="pycriu-agent-checks")
        if probe is not None:
            info = probe.result()  # _probe_now reports every failure in its result
            with self._probe_lock:
                if self._probe is probe:
                    self._local, self._probe = info, None
            return info
        assert self._local is not None
        return self._local


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
            if self.failed:
                for sub in self.dir.iterdir():
                    if sub.name != "work":
                        shutil.rmtree(sub, ignore_errors=True)
                log.warning("%s: session failed; CRIU logs kept in %s", self.name, self.dir / "work")
            else:
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
            result = criu.restore(RestoreOptions(images_dir=images, work_dir=work, log_file="restore.log",
                                                 log_level=self.config.log_level, lazy_pages=True if lazy else None,
                                                 leave_stopped=True, notify=notify, **flags))
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
        "bye": _bye,
    }
    _ALLOWED: dict[str, frozenset[str]] = {
        "new": frozenset({"hello"}),
        "ready": frozenset({"page-tls", "preflight",
                            "ping", "prepare-dir", "page-server", "file", "file-link", "files-done", "lazy-pages",
                            "restore",
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


# --- Serving ------------------------------------------------------------------------------------


def serve_stdio(config: AgentConfig) -> int:
    """Serve one session over this process's stdin/stdout; return the exit status."""
    config.prefetch()
    rfd = os.dup(0)
    wfd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints (ours or a child's) must never corrupt the protocol
    os.close(devnull)
    data_address, peer = "127.0.0.1", "127.0.0.1"
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) == 4:
        peer, data_address = ssh[0], ssh[2]
    channel = Channel(PipeStream(rfd, wfd), role="agent", timeout=config.idle_timeout)
    try:
        agent_authenticate(channel, None, _agent_name())
    except MigrationError as exc:
        log.error("cannot start the session: %s", exc.message)
        channel.close()
        return 1
    session = AgentSession(channel, config, data_address=data_address, peer_address=peer)
    session.run()
    return 1 if session.failed else 0


def _agent_name() -> str:
    return f"pycriu {__version__} agent on {socket.gethostname()}"


#: Connections that may be authenticating at once; more are closed at once (and logged).
MAX_HANDSHAKES = 32
#: Seconds a connection has to finish TLS and authentication.
HANDSHAKE_TIMEOUT = 30.0


def serve_tcp(config: AgentConfig, host: str = "127.0.0.1", port: int = 0, *, once: bool = False,
              announce: Any = None) -> int:
    """Accept sessions on ``host:port`` (authenticated); return the exit status.

    Every connection does its TLS handshake and authentication in a thread of its own (at most
    :data:`MAX_HANDSHAKES` at once, each within :data:`HANDSHAKE_TIMEOUT`), so that a peer that
    connects and says nothing, or one that sends a byte at a time, holds only its own thread:
    it never delays an honest peer. Authenticated sessions are served one after another in the
    main thread (where SIGTERM and Ctrl-C land, so a session always runs its cleanup); a second
    authenticated peer waits for the first session to end. ``once``: exit after one session.
    ``announce(host, port)`` is called once listening (default: print it on stdout)."""
    if config.secret is None and config.tls is None:
        raise InvalidOptionError("refusing to listen without authentication: give --secret-file and/or "
                                 "--tls-cert/--tls-key/--tls-ca")
    server = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        bound = server.getsockname()
        if announce is None:
            print(f"pycriu agent listening on {bound[0]}:{bound[1]}", flush=True)
        else:
            announce(bound[0], bound[1])
        context = config.tls.server_context() if config.tls is not None else None
        config.prefetch()  # warm: the first session finds this host's checks done
        ready: queue.Queue[_Authenticated] = queue.Queue()
        Worker(_accept_loop, server, config, context, ready, name="pycriu-agent-accept").start()
        while True:
            peer = ready.get()
            session = AgentSession(peer.channel, config, data_address=peer.local, peer_address=peer.address)
            session.run()
            if once:
                return 0 if not session.failed else 1
    finally:
        server.close()


@dataclass
class _Authenticated:
    channel: Channel
    address: str
    local: str


def _accept_loop(server: socket.socket, config: AgentConfig, context: ssl.SSLContext | None,
                 ready: queue.Queue[_Authenticated]) -> None:
    slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
    while True:
        try:
            conn, addr = server.accept()
        except OSError:  # the server socket was closed: the agent is ending
            return
        if not slots.acquire(blocking=False):
            log.warning("refused %s: %d connections are already authenticating", addr[0], MAX_HANDSHAKES)
            conn.close()
            continue
        Worker(_handshake, config, conn, addr, context, ready, slots, name=f"pycriu-agent-auth-{addr[0]}").start()


def _handshake(config: AgentConfig, conn: socket.socket, addr: Any, context: ssl.SSLContext | None,
               ready: queue.Queue[_Authenticated], slots: threading.BoundedSemaphore) -> None:
    try:
        peer = _authenticate(config, conn, addr, context)
    finally:
        slots.release()
    if peer is not None:
        ready.put(peer)


def _authenticate(config: AgentConfig, conn: socket.socket, addr: Any,
                  context: ssl.SSLContext | None) -> _Authenticated | None:
    """TLS (if configured) and the agent's authentication, within :data:`HANDSHAKE_TIMEOUT`;
    the authenticated peer, or None when it was refused (logged)."""
    peer = addr[0]
    config.prefetch()  # this session's checks, while TLS and authentication run
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = conn.getsockname()[0]
        if context is not None:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", peer, exc)
                conn.close()
                return None
        channel = Channel(SocketStream(conn), role="agent", timeout=config.idle_timeout)
    except OSError as exc:
        log.warning("connection from %s failed: %s", peer, exc)
        conn.close()
        return None
    try:
        agent_authenticate(channel, config.secret, _agent_name(), timeout=max(0.1, deadline - time.monotonic()))
    except MigrationError as exc:
        log.warning("refused %s: %s", peer, exc.message)
        channel.close()
        return None
    return _Authenticated(channel, peer, local)


# --- Command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, criu_option: bool = True) -> None:
    """The ``pycriu agent`` options (shared by the CLI and ``python -m pycriu.migration.agent``);
    ``criu_option=False`` when the parser already has a ``--criu``."""
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout (local, ssh://)")
    how.add_argument("--listen", metavar="HOST:PORT", help="serve sessions over TCP (tcp://); HOST defaults to "
                                                           "127.0.0.1, PORT 0 picks a free one")
    parser.add_argument("--root", metavar="DIR", help="directory for session data (default: a new temporary one)")
    parser.add_argument("--secret-file", metavar="FILE", help="shared secret for tcp:// clients")
    TLSConfig.add_arguments(parser, own="this agent's", ca="CA that signs accepted client certificates")
    parser.add_argument("--data-address", metavar="IP", help="address CRIU's page servers listen on "
                                                             "(default: the address the source reached)")
    parser.add_argument("--once", action="store_true", help="with --listen: exit after one session")
    parser.add_argument("--same-host", action="store_true",
                        help="with --stdio, for an agent the source starts on its own host (the local "
                             "transport does): accept whole images by hard link instead of by copy")
    parser.add_argument("--images-on-disk", action="store_true",
                        help="keep the lazy flows' images under --root too (default: in /dev/shm, a tmpfs, so "
                             "that no page touches a disk)")
    if criu_option:
        parser.add_argument("--criu", metavar="PATH", help="criu binary")
    parser.add_argument("--commit-timeout", type=float, default=120.0, metavar="S",
                        help="kill a restored tree the source has not committed after S seconds")
    parser.add_argument("--max-file-size", type=int, default=64 << 30, metavar="BYTES",
                        help="largest image file accepted")
    parser.add_argument("--max-files", type=int, default=100_000, metavar="N",
                        help="most image files accepted in one session")
    parser.add_argument("--page-server-from", action="append", default=[], metavar="IP",
                        help="also accept a source page server at IP (default: only the source's own address)")
    parser.add_argument("-v", "--verbose", action="store_true")


def read_secret(path: str) -> bytes:
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise InvalidOptionError(f"the secret in {path} is too short: use at least 16 bytes "
                                 "(for example `head -c 32 /dev/urandom | base64 > FILE`)")
    return data


def run_from_args(args: argparse.Namespace) -> int:
    """Run an agent from parsed :func:`add_arguments` options; returns the exit status."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="pycriu-agent[%(process)d] %(levelname)s %(message)s")
    try:
        tls = TLSConfig.from_args(args)
    except InvalidOptionError as exc:
        print(f"pycriu agent: {exc}", file=sys.stderr)
        return 2
    if args.same_host and not args.stdio:
        print("pycriu agent: --same-host is for --stdio (an agent the source starts on its own host)",
              file=sys.stderr)
        return 2
    own_root = args.root is None
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="pycriu-agent-"))
    config = AgentConfig(root=root, memory_images=not args.images_on_disk, same_host=args.same_host,
                         secret=read_secret(args.secret_file) if args.secret_file else None, tls=tls,
                         data_address=args.data_address, criu_binary=getattr(args, "criu", None),
                         commit_timeout=args.commit_timeout,
                         max_file_size=args.max_file_size, max_files=args.max_files,
                         page_server_addresses=tuple(args.page_server_from))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.stdio:
            return serve_stdio(config)
        host, _, port = args.listen.rpartition(":")
        return serve_tcp(config, host.strip("[]") or "127.0.0.1", int(port or 0), once=args.once)
    except InvalidOptionError as exc:
        print(f"pycriu agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if own_root:
            try:
                root.rmdir()  # only when empty: the logs of failed sessions stay
            except OSError:
                log.warning("kept %s (logs of failed sessions)", root)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pycriu agent", description="Destination agent of pycriu migrations.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown (20-30 ms that the source waits for): every
    session resource was released by its owner already; flush what is buffered first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    _exit_now(main())
