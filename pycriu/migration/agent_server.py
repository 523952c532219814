"""Serving agent sessions: one over stdin/stdout (``--stdio``), or many over TCP (``--listen``),
each connection authenticated in a thread of its own and the sessions served one after another
in the main thread."""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .._threads import Worker
from ..errors import InvalidOptionError
from . import controltls
from .agent_config import AgentConfig
from .agent_session import AgentSession
from .errors import MigrationError
from .protocol import (
    Channel,
    agent_authenticate,
)
from .transport import PipeStream, SocketStream

__all__ = ["serve_stdio", "serve_tcp", "MAX_HANDSHAKES", "HANDSHAKE_TIMEOUT"]

log = logging.getLogger("pycriu.agent")


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
        context, binding = _server_tls(config)
        config.prefetch()  # warm: the first session finds this host's checks done
        ready: queue.Queue[_Authenticated] = queue.Queue()
        Worker(_accept_loop, server, config, _Tls(context, binding), ready, name="pycriu-agent-accept").start()
        while True:
            peer = ready.get()
            session = AgentSession(peer.channel, config, data_address=peer.local, peer_address=peer.address)
            session.run()
            if once:
                return 0 if not session.failed else 1
    finally:
        server.close()


def _server_tls(config: AgentConfig) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context every connection starts with, and the binding the secret's proofs cover:
    the user's certificates; else, with a shared secret, a throw-away certificate of this agent
    (:mod:`.controltls`); plain TCP only with ``insecure_plaintext``."""
    if config.tls is not None:
        binding = controltls.binding_of_file(config.tls.cert) if config.secret is not None else None
        return config.tls.server_context(), binding
    if config.insecure_plaintext:
        log.warning("--insecure-plaintext: the control channel (in classic mode the process's memory) crosses "
                    "the network in the clear; it is only authenticated and MAC'd by the shared secret")
        return None, None
    identity = controltls.AgentIdentity()
    return identity.server_context(), identity.binding


@dataclass(frozen=True)
class _Tls:
    context: ssl.SSLContext | None
    binding: str | None


@dataclass
class _Authenticated:
    channel: Channel
    address: str
    local: str


def _accept_loop(server: socket.socket, config: AgentConfig, tls: _Tls,
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
        Worker(_handshake, config, conn, addr, tls, ready, slots, name=f"pycriu-agent-auth-{addr[0]}").start()


def _handshake(config: AgentConfig, conn: socket.socket, addr: Any, tls: _Tls,
               ready: queue.Queue[_Authenticated], slots: threading.BoundedSemaphore) -> None:
    try:
        peer = _authenticate(config, conn, addr, tls)
    finally:
        slots.release()
    if peer is not None:
        ready.put(peer)


def _authenticate(config: AgentConfig, conn: socket.socket, addr: Any, tls: _Tls) -> _Authenticated | None:
    """TLS (if configured) and the agent's authentication, within :data:`HANDSHAKE_TIMEOUT`;
    the authenticated peer, or None when it was refused (logged)."""
    peer = addr[0]
    config.prefetch()  # this session's checks, while TLS and authentication run
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = conn.getsockname()[0]
        if tls.context is not None:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                conn = tls.context.wrap_socket(conn, server_side=True)
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
        agent_authenticate(channel, config.secret, _agent_name(), binding=tls.binding,
                           timeout=max(0.1, deadline - time.monotonic()))
    except MigrationError as exc:
        log.warning("refused %s: %s", peer, exc.message)
        channel.close()
        return None
    return _Authenticated(channel, peer, local)
