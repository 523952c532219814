"""How the source reaches the destination agent: ``local``, ``ssh://`` or ``tcp://``.

* ``local``: ``python -m pycriu.migration.agent --stdio`` as a subprocess with its own temporary
  root directory (removed afterwards); the protocol runs over its stdin/stdout.
* ``ssh://[user@]host[:port]``: the real OpenSSH client runs ``pycriu agent --stdio`` on the
  host; SSH authenticates both ends and encrypts the control channel.
* ``tcp://host:port``: a running ``pycriu agent --listen``; TLS with client certificates
  (mutual authentication) and/or a shared secret (HMAC challenge-response, MAC'd frames). Plain
  TCP with neither is refused by both sides.

Every :class:`Connection` owns what it started (socket, subprocess, temporary root) and
:meth:`Connection.close` releases all of it, on every path.
"""

from __future__ import annotations

import fcntl
import os
import select
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from .._process import stop_process
from ..errors import InvalidOptionError
from . import controltls
from .errors import TransportError
from .protocol import Channel, client_authenticate

__all__ = ["Destination", "TLSConfig", "Connection", "SocketStream", "PipeStream", "connect",
           "DEFAULT_REMOTE_AGENT"]

#: What ``ssh://`` runs on the destination unless ``agent_command`` says otherwise.
DEFAULT_REMOTE_AGENT = ("pycriu", "agent", "--stdio")
#: Pipe buffer asked for the stdio transports (``fs.pipe-max-size`` permitting).
PIPE_SIZE = 1 << 20


@dataclass(frozen=True)
class Destination:
    """A parsed ``to=`` argument."""

    kind: str  # local | ssh | tcp
    host: str | None = None
    port: int | None = None
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        if not isinstance(text, str) or not text:
            raise InvalidOptionError(f"destination {text!r} is invalid: use 'local', 'ssh://[user@]host[:port]' "
                                     "or 'tcp://host:port'")
        if text == "local":
            return cls("local")
        parts = urlsplit(text)
        if parts.scheme not in ("ssh", "tcp") or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidOptionError(f"destination {text!r} is invalid: use 'local', 'ssh://[user@]host[:port]' "
                                     "or 'tcp://host:port'")
        try:
            port = parts.port
        except ValueError:
            raise InvalidOptionError(f"destination {text!r} has an invalid port") from None
        host = parts.hostname
        if not host:
            raise InvalidOptionError(f"destination {text!r} names no host")
        if parts.password is not None:
            raise InvalidOptionError("put no password in the destination: use SSH keys or --secret-file")
        if parts.scheme == "tcp":
            if port is None:
                raise InvalidOptionError(f"destination {text!r} needs a port: tcp://host:port")
            if parts.username is not None:
                raise InvalidOptionError("tcp:// destinations take no user name")
        return cls(parts.scheme, host, port, parts.username)

    @property
    def same_host(self) -> bool:
        """The agent runs on this host (``local``): one PID space, one filesystem, one /dev/shm."""
        return self.kind == "local"

    @property
    def needs_credentials(self) -> bool:
        """The connection authenticates nobody by itself (``tcp://``): a shared secret or TLS
        certificates must be given. (``ssh://`` is authenticated by SSH, ``local`` by the pipe.)"""
        return self.kind == "tcp"

    @property
    def pages_leave_host(self) -> bool:
        """CRIU's page connections cross a network: TLS for them is on by default."""
        return not self.same_host

    @property
    def has_own_address(self) -> bool:
        """The source's address towards the agent is the control connection's own local
        address (a direct TCP connection; ssh's may go through a jump host or a proxy)."""
        return self.kind == "tcp"

    def transport(self, tls: bool, insecure_plaintext: bool = False) -> str:
        """The report's name of the transport: ``local``, ``ssh``, ``tcp+tls`` (the user's
        certificates), ``tcp+secret+tls`` (a shared secret, over TLS bound to it: the default) or
        ``tcp+secret+plaintext`` (the explicit opt-out)."""
        if self.kind == "tcp":
            if tls:
                return "tcp+tls"
            return "tcp+secret+plaintext" if insecure_plaintext else "tcp+secret+tls"
        return self.kind

    def __str__(self) -> str:
        if self.kind == "local":
            return "local"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.kind}://{user}{host}{port}"


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS with mutual authentication: this side's certificate and key, and the CA
    that signed the peer's certificate. The same files are handed to CRIU for its own page
    connections (``--tls``)."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = os.fspath(getattr(self, name))
            if not os.path.isfile(value):
                raise InvalidOptionError(f"TLS {name} file {value!r} does not exist")
            object.__setattr__(self, name, os.path.abspath(value))

    @staticmethod
    def add_arguments(group: Any, *, own: str, ca: str) -> None:
        """``--tls-cert``, ``--tls-key`` and ``--tls-ca`` on an argparse parser or group
        (``pycriu migrate`` and ``pycriu agent``); :meth:`from_args` reads them back."""
        group.add_argument("--tls-cert", metavar="PEM", help=f"{own} certificate (TLS)")
        group.add_argument("--tls-key", metavar="PEM", help="its private key")
        group.add_argument("--tls-ca", metavar="PEM", help=ca)

    @classmethod
    def from_args(cls, args: Any) -> TLSConfig | None:
        """The :meth:`add_arguments` options as a TLSConfig, ``None`` without them; all three
        or none (:class:`InvalidOptionError` names them)."""
        given = (args.tls_cert, args.tls_key, args.tls_ca)
        if not any(given):
            return None
        if not all(given):
            raise InvalidOptionError("TLS needs --tls-cert, --tls-key and --tls-ca")
        return cls(*given)

    def criu_options(self) -> dict[str, Any]:
        """The CRIU options (``DumpOptions``, ``PageServerOptions``, ...) that hand these files to
        CRIU for its own page connections; CRIU then checks that the certificates name the hosts."""
        return {"tls": True, "tls_cacert": self.ca, "tls_cert": self.cert, "tls_key": self.key}

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # the client must present a certificate from our CA
        return ctx


# --- Streams ------------------------------------------------------------------------------------


class SocketStream:
    """A (TLS) socket as a :class:`~pycriu.migration.protocol.Stream`."""

    def __init__(self, sock: socket.socket, *, write_timeout: float = 120.0) -> None:
        self.sock = sock
        self.write_timeout = write_timeout

    def write(self, data: bytes | memoryview) -> None:
        self.sock.settimeout(self.write_timeout)
        self.sock.sendall(data)

    def read_exact(self, n: int, timeout: float | None) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while got < n:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise TimeoutError
            self.sock.settimeout(left)
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError
            got += k
        return bytes(buf)

    def raw_fds(self) -> tuple[int, int] | None:
        """The socket's descriptor for ``sendfile``/``splice``; None under TLS (whose records
        are made in this process)."""
        if isinstance(self.sock, ssl.SSLSocket) or self.sock.fileno() < 0:
            return None
        return self.sock.fileno(), self.sock.fileno()

    def peer_gone(self) -> bool:
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready:
            return False
        try:
            if isinstance(self.sock, ssl.SSLSocket):  # peek below the TLS records, at the TCP stream
                with socket.socket(fileno=os.dup(self.sock.fileno())) as raw:
                    return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.settimeout(1.0)
                try:
                    self.sock.unwrap()
                except (OSError, ValueError):
                    pass
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class PipeStream:
    """Two file descriptors (a subprocess's stdout/stdin, or our own stdin/stdout)."""

    def __init__(self, rfd: int, wfd: int, *, write_timeout: float = 120.0) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.write_timeout = write_timeout
        os.set_blocking(wfd, False)
        for fd in (rfd, wfd):  # fewer wake-ups per MiB of file data (best effort, up to the sysctl)
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass

    def raw_fds(self) -> tuple[int, int] | None:
        """Both descriptors, for ``sendfile``/``splice`` of file data."""
        return self.rfd, self.wfd

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.write_timeout
        while view:
            try:
                n = os.write(self.wfd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("peer stopped reading")
            select.select([], [self.wfd], [], left)

    def read_exact(self, n: int, timeout: float | None) -> bytes:
        chunks: list[bytes] = []
        got = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while got < n:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            data = os.read(self.rfd, min(n - got, 1 << 20))
            if not data:
                raise EOFError
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def peer_gone(self) -> bool:
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN | select.POLLHUP)
        poller.register(self.wfd, select.POLLOUT)
        for fd, ev in poller.poll(0):
            if ev & (select.POLLHUP | select.POLLERR) and not (fd == self.rfd and ev & select.POLLIN):
                return True
        return False

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            try:
                os.close(fd)
            except OSError:
                pass


# --- Connections --------------------------------------------------------------------------------


class Connection:
    """One session with an agent: the framed channel and everything behind it."""

    def __init__(self, destination: Destination, channel: Channel, *, process: subprocess.Popen[bytes] | None = None,
                 root: Path | None = None, tls: bool = False, stderr: IO[bytes] | None = None,
                 local_address: str | None = None, insecure_plaintext: bool = False) -> None:
        self.destination = destination
        self.channel = channel
        self.process = process
        self.root = root
        self.tls = tls
        self.insecure_plaintext = insecure_plaintext
        self.local_address = local_address
        self._stderr = stderr
        self.welcome: dict[str, object] = {}

    @property
    def transport(self) -> str:
        return self.destination.transport(self.tls, self.insecure_plaintext)

    def kill_agent(self) -> None:
        """Kill the agent process this connection started (local and ssh transports)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def close(self, timeout: float = 30.0) -> None:
        """Close the channel, let the agent finish its cleanup (killed after ``timeout``), reap it
        and remove the local agent's root directory. Idempotent."""
        self.channel.close()
        proc, self.process = self.process, None
        try:
            if proc is not None:
                stop_process(proc, timeout, ask=None)  # Ctrl-C meanwhile: killed at once
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
            root, self.root = self.root, None
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)


def _agent_env() -> dict[str, str]:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def connect(destination: Destination, *, secret: bytes | None = None, tls: TLSConfig | None = None,
            ssh_options: tuple[str, ...] = (), identity_file: str | None = None,
            agent_command: tuple[str, ...] | None = None, stderr_path: Path | None = None,
            timeout: float = 60.0, ssh_binary: str = "ssh", insecure_plaintext: bool = False) -> Connection:
    """Reach the agent at ``destination`` and authenticate; the caller owns the result.
    ``insecure_plaintext``: with only a shared secret, talk to the agent without TLS."""
    if destination.kind == "local":
        return _connect_local(destination, agent_command, stderr_path, timeout)
    if destination.kind == "ssh":
        return _connect_ssh(destination, ssh_options, identity_file, agent_command, stderr_path, timeout,
                            ssh_binary)
    return _connect_tcp(destination, secret, tls, timeout, insecure_plaintext)


def _spawn(argv: list[str], stderr_path: Path | None, env: dict[str, str] | None) -> tuple[
        subprocess.Popen[bytes], IO[bytes] | None]:
    stderr: IO[bytes] | None = open(stderr_path, "ab") if stderr_path is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr if stderr is not None else subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    except OSError as exc:
        if stderr is not None:
            stderr.close()
        raise TransportError(f"cannot start {argv[0]}: {exc}") from exc
    return proc, stderr


def _stdio_connection(destination: Destination, proc: subprocess.Popen[bytes], stderr: IO[bytes] | None,
                      root: Path | None, timeout: float, what: str) -> Connection:
    assert proc.stdin is not None and proc.stdout is not None
    rfd = os.dup(proc.stdout.fileno())
    wfd = os.dup(proc.stdin.fileno())
    proc.stdout.close()
    proc.stdin.close()
    channel = Channel(PipeStream(rfd, wfd), role="client", timeout=timeout)
    conn = Connection(destination, channel, process=proc, root=root, stderr=stderr, local_address="127.0.0.1")
    try:
        conn.welcome = client_authenticate(channel, None, require=False)
    except BaseException as exc:
        conn.close(timeout=5)
        if isinstance(exc, TransportError):
            raise TransportError(f"{what} did not start: {exc.message}",
                                 hint="see the agent's stderr in the migration log directory (agent.log)") from None
        raise
    return conn


def _connect_local(destination: Destination, agent_command: tuple[str, ...] | None, stderr_path: Path | None,
                   timeout: float) -> Connection:
    root = Path(tempfile.mkdtemp(prefix="pycriu-agent-"))
    argv = [*(agent_command or (sys.executable, "-m", "pycriu.migration.agent", "--stdio", "--same-host")),
            "--root", str(root)]
    try:
        proc, stderr = _spawn(argv, stderr_path, _agent_env())
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return _stdio_connection(destination, proc, stderr, root, timeout, "the local agent")


def _connect_ssh(destination: Destination, ssh_options: tuple[str, ...], identity_file: str | None,
                 agent_command: tuple[str, ...] | None, stderr_path: Path | None, timeout: float,
                 ssh_binary: str) -> Connection:
    assert destination.host is not None
    argv = [ssh_binary, "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", f"ConnectTimeout={max(1, int(timeout))}"]
    if identity_file is not None:
        argv += ["-i", os.fspath(identity_file), "-o", "IdentitiesOnly=yes"]
    if destination.port is not None:
        argv += ["-p", str(destination.port)]
    if destination.user is not None:
        argv += ["-l", destination.user]
    argv += [*ssh_options, "--", destination.host]
    argv.append(shlex.join(agent_command or DEFAULT_REMOTE_AGENT))
    proc, stderr = _spawn(argv, stderr_path, None)
    return _stdio_connection(destination, proc, stderr, None, timeout, f"the agent over SSH ({destination})")


def _connect_tcp(destination: Destination, secret: bytes | None, tls: TLSConfig | None,
                 timeout: float, insecure_plaintext: bool = False) -> Connection:
    assert destination.host is not None and destination.port is not None
    if secret is None and tls is None:
        raise InvalidOptionError(
            "tcp:// needs authentication: pass secret=... (shared secret) or tls=TLSConfig(...)",
            hint="pycriu migrate ... --secret-file FILE, or --tls-cert/--tls-key/--tls-ca")
    try:
        sock = socket.create_connection((destination.host, destination.port), timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to the agent at {destination}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local_address = sock.getsockname()[0]
        binding = None
        if tls is not None:
            try:
                sock = tls.client_context().wrap_socket(sock, server_hostname=destination.host)
            except (ssl.SSLError, OSError) as exc:
                raise TransportError(f"TLS handshake with the agent at {destination} failed: {exc}",
                                     hint="check that both sides use certificates from the same CA and "
                                          "that the agent's certificate names the host you connect to") from exc
        elif not insecure_plaintext:
            sock.settimeout(timeout)
            try:
                sock = controltls.client_context().wrap_socket(sock)
            except (ssl.SSLError, OSError) as exc:
                raise TransportError(f"TLS handshake with the agent at {destination} failed: {exc}",
                                     hint="an agent started with --insecure-plaintext speaks no TLS: restart it "
                                          "without, or pass insecure_plaintext=True (pycriu migrate "
                                          "--insecure-plaintext) to send the process's memory in the clear") from exc
        if isinstance(sock, ssl.SSLSocket) and secret is not None:
            binding = controltls.binding_of(sock)
        channel = Channel(SocketStream(sock), role="client", timeout=timeout)
    except BaseException:
        sock.close()
        raise
    conn = Connection(destination, channel, tls=tls is not None, local_address=local_address,
                      insecure_plaintext=insecure_plaintext and tls is None)
    try:
        conn.welcome = client_authenticate(channel, secret, require=tls is None, binding=binding)
    except BaseException:
        conn.close()
        raise
    return conn
