"""The agent protocol, version 1: frames, messages, authentication and file streaming.

Wire format (both directions)::

    frame   = kind:u8  length:u32be  payload[length]  [mac[32]]
    kind    = 1 (control: one JSON object, UTF-8, at most 1 MiB)
            | 2 (data: raw bytes of a file being streamed, at most 1 MiB per frame)
    mac     = HMAC-SHA256(session_key, direction || seq:u64be || kind || length || payload)
              present only once a shared-secret session is established

Every control message is a JSON object with a ``type`` and a fixed set of typed fields
(:data:`MESSAGES`); anything else (unknown type, unknown or missing field, wrong type, duplicate
key, NaN, oversize frame) is a :class:`~pycriu.ProtocolError` and ends the session. JSON is the
only decoder: no pickle, no eval.

A file travels as one ``file`` control message (``dir``, ``name``, ``size`` and, for a sparse file,
the byte ``ranges`` that follow) and then data frames carrying exactly that many bytes. The
receiver checks the name against :data:`IMAGE_NAME` (or :data:`LOG_NAME`), creates the file with
``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to a directory fd it opened itself, and enforces size limits
before writing.

Authentication (``tcp://`` without TLS, or in addition to TLS): the agent's ``welcome`` carries a
random nonce ``A``; the client answers with its own nonce ``B`` and
``HMAC(secret, "pycriu-auth-v1|client|" A B)``; the agent checks it with a constant-time compare
and proves it knows the secret too with ``HMAC(secret, "pycriu-auth-v1|agent|" A B)``. From then on
every frame carries a MAC under ``HMAC(secret, "pycriu-session-v1|" A B)`` with per-direction
sequence numbers, so frames cannot be forged, replayed, reordered or dropped unnoticed.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import select
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import AgentError, AuthenticationError, ProtocolError, TransportError

__all__ = [
    "PROTOCOL_VERSION", "MESSAGES", "IMAGE_NAME", "LOG_NAME", "DIR_NAME", "Channel", "Stream",
    "ChannelStats", "Limits", "check_image_name", "check_dir_name", "validate", "send_file",
    "receive_file", "link_file", "accept_link", "client_authenticate", "agent_authenticate",
]

PROTOCOL_VERSION = 1

KIND_CONTROL = 1
KIND_DATA = 2
_HEADER = struct.Struct(">BI")
MAC_SIZE = 32
MAX_CONTROL = 1 << 20
MAX_DATA = 1 << 20
_FRAME_LIMITS = {KIND_CONTROL: MAX_CONTROL, KIND_DATA: MAX_DATA}
CHUNK = 1 << 20

#: CRIU image file names: lowercase words joined by '-' or '_', dot-separated parts, ``.img`` at
#: the end (``pages-1.img``, ``tmpfs-dev-42.tar.gz.img``). No '/', no '..', no empty part, no
#: leading dot, at most 128 characters.
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}(?:\.[a-z0-9_-]{1,31}){0,4}\.img")
#: CRIU log file names the agent sends back.
LOG_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}\.log")
#: Directories inside a session: the final images, and one per pre-dump iteration.
DIR_NAME = re.compile(r"images|pre-[1-9][0-9]{0,3}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FLAG_NAME = re.compile(r"[a-z][a-z_]{0,31}")


def agent_error(msg: Mapping[str, Any]) -> AgentError:
    """The agent's ``error`` message (validated) as the exception the source raises."""
    return AgentError(f"the agent reported: {msg['message']}", code=msg["code"])


def check_image_name(name: Any, pattern: re.Pattern[str] = IMAGE_NAME) -> str:
    """Return ``name`` if it is an allowed file name, else raise :class:`ProtocolError`."""
    if not isinstance(name, str) or len(name) > 128 or not pattern.fullmatch(name):
        raise ProtocolError(f"refused file name {name!r}: not an allowed image name "
                            "(no '/', no '..', no absolute path; lowercase CRIU image names only)")
    return name


def check_dir_name(name: Any) -> str:
    if not isinstance(name, str) or not DIR_NAME.fullmatch(name):
        raise ProtocolError(f"refused directory name {name!r}: use 'images' or 'pre-N'")
    return name


# --- Message schemas ---------------------------------------------------------------------------

# A field spec is (python type(s), required). ``dict`` specs nest. "?" in a type tuple allows None.
_Opt = type(None)
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_BOOL = (bool,)
_FEATURES = {"lazy_pages": (_BOOL, True), "mem_track": (_BOOL, True)}
_ADDRESS = {"address": (_STR, True), "port": (_INT, True)}
_VERSIONS = {"protocol": (_INT, True), "pycriu": (_STR, True), "criu": (_STR, True),
             "arch": (_STR, True), "kernel": (_STR, True), "features": (_FEATURES, True)}

#: Every message type of protocol version 1 and its fields.
MESSAGES: dict[str, dict[str, Any]] = {
    # agent -> client, first message of every session
    "welcome": {"protocol": (_INT, True), "agent": (_STR, True), "auth": (_STR, True),
                "nonce": ((str, _Opt), True)},
    "auth": {"nonce": (_STR, True), "mac": (_STR, True)},
    "auth-ok": {"mac": (_STR, True)},
    "hello": {**_VERSIONS, "mode": (_STR, False), "criu_check": (_BOOL, False),
              "criu_error": ((str, _Opt), False), "session": (_STR, False),
              "data_address": (_STR, False), "peer_address": ((str, _Opt), False),
              # page TLS (pagetls.py): the source asks, the agent answers with a certificate request
              "page_tls": (_BOOL, False), "tls_csr": ((str, _Opt), False),
              # a local agent: the device of its images directory, where it accepts hard links
              "link_dev": ((int, _Opt), False)},
    "page-tls": {"cert": (_STR, True), "ca": (_STR, True)},
    "page-tls-ok": {},
    "ping": {"t": (_NUM, True)},
    "pong": {"t": (_NUM, True)},
    "prepare-dir": {"dir": (_STR, True), "parent": ((str, _Opt), True)},
    "dir-ready": {"dir": (_STR, True)},
    "page-server": {"dir": (_STR, True), "parent": ((str, _Opt), False), "address": ((str, _Opt), False),
                    "port": (_INT, False), "tls": (_BOOL, False)},
    "file": {"dir": (_STR, True), "name": (_STR, True), "size": (_INT, True),
             "ranges": ((list, _Opt), False)},
    # a local agent (same host, same filesystem) takes an image by hard link instead of a copy
    "file-link": {"dir": (_STR, True), "name": (_STR, True), "size": (_INT, True), "path": (_STR, True)},
    "files-done": {"dir": (_STR, True), "count": (_INT, True), "bytes": (_INT, True)},
    "files-ok": {"count": (_INT, True), "bytes": (_INT, True)},
    "lazy-pages": {"dir": (_STR, True), "page_server": (_ADDRESS, True), "tls": (_BOOL, False)},
    "restore": {"dir": (_STR, True), "lazy": (_BOOL, True),
                "page_server": ((_ADDRESS, _Opt), True), "flags": (dict, True), "tls": (_BOOL, False)},
    "restored": {"pid": (_INT, True), "resumed_ago": (_NUM, True), "restore_seconds": (_NUM, True),
                 "lazy_daemon_seconds": ((int, float, _Opt), True), "stats": ((dict, _Opt), True),
                 "page_server_wait": (_NUM, True)},
    # before the freeze: what the live tree needs from the destination, checked there
    "preflight": {"files": (list, True), "tcp_ports": (list, True), "unix_paths": (list, True)},
    "preflight-ok": {"problems": (list, True)},
    "commit": {},
    "committed": {"pid": (_INT, True), "resumed_ago": (_NUM, False)},
    "abort": {"reason": (_STR, True)},
    "aborted": {"killed": ((int, _Opt), True)},
    "lazy-wait": {"timeout": (_NUM, True)},
    "lazy-done": {"ok": (_BOOL, True), "status": ((int, _Opt), True), "error": ((str, _Opt), True),
                  "killed": ((int, _Opt), True), "seconds": (_NUM, True), "pages": ((int, _Opt), True),
                  "uncork": ((str, _Opt), False)},
    "logs": {},
    # hybrid: the pagemaps a pre-dump's page server wrote, back to the source (whose lazy final
    # dump must see its parent's pagemaps locally to leave the pre-copied pages out)
    "pagemaps": {"dir": (_STR, True)},
    "bye": {"disk": ((dict, _Opt), False), "memory": ((dict, _Opt), False)},
    "error": {"code": (_STR, True), "message": (_STR, True)},
}

#: Who may send which message (the receiver refuses the rest).
FROM_CLIENT = frozenset({"auth", "hello", "page-tls", "ping", "preflight",
                         "prepare-dir", "page-server", "file", "file-link", "files-done", "files-ok",
                         "lazy-pages",
                         "restore", "commit",
                         "abort", "lazy-wait", "logs", "pagemaps", "bye"})
FROM_AGENT = frozenset({"welcome", "auth-ok", "hello", "page-tls-ok", "preflight-ok",
                        "pong", "dir-ready", "page-server", "file", "files-done",
                        "files-ok", "restored", "committed", "aborted", "lazy-done", "bye", "error"})


def _check_fields(where: str, value: Any, spec: Mapping[str, Any]) -> None:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object")
    unknown = set(value) - set(spec) - ({"type"} if where.count(".") == 0 else set())
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(unknown)}")
    for name, (types, required) in spec.items():
        if name not in value:
            if required:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        item = value[name]
        if isinstance(types, dict):
            _check_fields(f"{where}.{name}", item, types)
            continue
        if isinstance(types, tuple) and len(types) == 2 and isinstance(types[0], dict):
            if item is None and types[1] is _Opt:
                continue
            _check_fields(f"{where}.{name}", item, types[0])
            continue
        tuple_types = types if isinstance(types, tuple) else (types,)
        if isinstance(item, bool) and bool not in tuple_types:
            raise ProtocolError(f"{where}.{name}: expected {_names(tuple_types)}, got a boolean")
        if not isinstance(item, tuple_types):
            raise ProtocolError(f"{where}.{name}: expected {_names(tuple_types)}, got {type(item).__name__}")
        if isinstance(item, str) and len(item) > 4096:
            raise ProtocolError(f"{where}.{name}: string too long")
        if isinstance(item, int) and not isinstance(item, bool) and not -(1 << 63) <= item < (1 << 64):
            raise ProtocolError(f"{where}.{name}: integer out of range")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _Opt else t.__name__ for t in types)


def validate(msg: Any, *, sender: str) -> dict[str, Any]:
    """Check a decoded control message from ``sender`` ("client" or "agent"); return it."""
    if not isinstance(msg, dict):
        raise ProtocolError("control message is not a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}")
    allowed = FROM_CLIENT if sender == "client" else FROM_AGENT
    if kind not in allowed:
        raise ProtocolError(f"a {sender} may not send {kind!r}")
    _check_fields(kind, msg, MESSAGES[kind])
    return msg


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


def encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def decode(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"control frame is not valid JSON: {exc}") from None


# --- Streams and the framed channel -------------------------------------------------------------


class Stream(Protocol):
    """A reliable byte stream (socket, TLS socket, or a pair of pipes)."""

    def write(self, data: bytes | memoryview) -> None: ...

    def read_exact(self, n: int, timeout: float | None) -> bytes: ...

    def close(self) -> None: ...

    def peer_gone(self) -> bool: ...


def _raw_fds(stream: Stream) -> tuple[int, int] | None:
    """The stream's (read, write) file descriptors when bytes written to them reach the peer
    unchanged (pipes, a plain socket); None for TLS or anything not backed by descriptors."""
    fn = getattr(stream, "raw_fds", None)
    return fn() if fn is not None else None


@dataclass
class ChannelStats:
    """Bytes on the wire, by channel and direction (frame headers and MACs included)."""

    control_sent: int = 0
    control_received: int = 0
    data_sent: int = 0
    data_received: int = 0
    files_sent: int = 0
    files_received: int = 0

    @property
    def control(self) -> int:
        return self.control_sent + self.control_received

    @property
    def data(self) -> int:
        return self.data_sent + self.data_received


class Channel:
    """Frames over a :class:`Stream`: JSON control messages and raw data, optionally MAC'd.

    ``role`` is this end ("client" or "agent"); received control messages are validated as
    coming from the other role. Not thread-safe: one user at a time.
    """

    def __init__(self, stream: Stream, *, role: str, timeout: float | None = 60.0) -> None:
        if role not in ("client", "agent"):
            raise ValueError("role must be 'client' or 'agent'")
        self.stream = stream
        self.role = role
        self.peer = "agent" if role == "client" else "client"
        self.timeout = timeout
        self.stats = ChannelStats()
        self._key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.closed = False

    # -- MAC -------------------------------------------------------------------------------------

    def enable_mac(self, key: bytes) -> None:
        """From now on, sign every frame sent and check every frame received."""
        self._key = key
        self._send_seq = self._recv_seq = 0

    @property
    def authenticated_frames(self) -> bool:
        return self._key is not None

    @property
    def zero_copy(self) -> bool:
        """Whether file data moves by ``sendfile``/``splice``, never entering Python memory.

        Only when frames carry no MAC (a MAC needs every byte in Python): the local and
        ``ssh://`` transports, where the operating system or SSH vouches for the peer. With a
        shared secret (MAC'd frames) or TLS (encrypted in this process) file data goes through
        Python in 1 MiB frames. The frames on the wire are the same either way.
        """
        return ZERO_COPY and self._key is None and not self.closed and _raw_fds(self.stream) is not None

    def _mac(self, direction: str, seq: int, header: bytes, payload: bytes | memoryview) -> bytes:
        assert self._key is not None
        h = hmac.new(self._key, direction.encode() + struct.pack(">Q", seq) + header, hashlib.sha256)
        h.update(payload)
        return h.digest()

    # -- frames ----------------------------------------------------------------------------------

    def _send_frame(self, kind: int, payload: bytes | memoryview) -> int:
        if self.closed:
            raise TransportError("connection already closed")
        header = _HEADER.pack(kind, len(payload))
        parts: list[bytes | memoryview] = [header, payload]
        if self._key is not None:
            parts.append(self._mac(self.role, self._send_seq, header, payload))
            self._send_seq += 1
        try:
            if len(payload) < 65536:
                self.stream.write(b"".join(bytes(p) for p in parts))
            else:
                for part in parts:
                    self.stream.write(part)
        except (OSError, ValueError) as exc:
            self.close()  # a partly sent frame: the stream is unusable
            raise TransportError(f"connection to the {self.peer} broke while sending: {exc}") from exc
        return sum(len(p) for p in parts)

    def _read_header(self, timeout: float | None) -> tuple[bytes, int, int]:
        """The next frame's header, its kind and length, both checked (the one header reader)."""
        header = self._read(_HEADER.size, timeout)
        kind, length = _HEADER.unpack(header)
        limit = _FRAME_LIMITS.get(kind)
        if limit is None:
            raise ProtocolError(f"unknown frame kind {kind}")
        if length > limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
        return header, kind, length

    def _not_data(self, payload: bytes) -> Exception:
        """What a control frame where file data was due means: the agent's error, or a protocol error."""
        msg = decode(payload)
        if isinstance(msg, dict) and msg.get("type") == "error" and self.peer == "agent":
            return agent_error(validate(msg, sender="agent"))
        return ProtocolError("expected file data, got a control message")

    def _recv_frame(self, timeout: float | None) -> tuple[int, bytes]:
        header, kind, length = self._read_header(timeout)
        payload = self._read(length, timeout) if length else b""
        size = _HEADER.size + length
        if self._key is not None:
            mac = self._read(MAC_SIZE, timeout)
            if not hmac.compare_digest(mac, self._mac(self.peer, self._recv_seq, header, payload)):
                raise AuthenticationError("frame authentication failed (forged, replayed or corrupted frame)")
            self._recv_seq += 1
            size += MAC_SIZE
        if kind == KIND_CONTROL:
            self.stats.control_received += size
        else:
            self.stats.data_received += size
        return kind, payload

    @contextmanager
    def _mid_frame(self, timeout: float | None, broke: str) -> Iterator[None]:
        """A read that fails leaves the stream mid-frame: close it, and raise the failure as a
        :class:`TransportError` (``broke`` words an I/O error)."""
        try:
            yield
        except TimeoutError:
            self.close()
            raise TransportError(f"timed out after {timeout:.0f} s waiting for the {self.peer}") from None
        except EOFError:
            self.close()
            raise TransportError(f"the {self.peer} closed the connection") from None
        except OSError as exc:
            self.close()
            raise TransportError(f"{broke}: {exc}") from exc

    def _read(self, n: int, timeout: float | None) -> bytes:
        """Read exactly ``n`` bytes; any failure leaves the stream mid-frame, so it is closed."""
        if self.closed:
            raise TransportError("connection already closed")
        with self._mid_frame(timeout, f"connection to the {self.peer} broke"):
            return self.stream.read_exact(n, timeout)

    # -- messages --------------------------------------------------------------------------------

    def send(self, msg: Mapping[str, Any]) -> None:
        """Send one control message (checked against the schema first)."""
        validate(dict(msg), sender=self.role)
        payload = encode(msg)
        if len(payload) > MAX_CONTROL:
            raise ProtocolError("control message too large")
        self.stats.control_sent += self._send_frame(KIND_CONTROL, payload)

    def send_data(self, data: bytes | memoryview) -> None:
        if len(data) > MAX_DATA:
            raise ValueError("data frame too large")
        self.stats.data_sent += self._send_frame(KIND_DATA, data)

    def send_file_data(self, fd: int, offset: int, length: int, *,
                       on_bytes: Callable[[int], None] | None = None) -> None:
        """Send ``length`` bytes of file ``fd`` from ``offset`` as data frames, with ``sendfile``
        straight from the page cache into the stream (see :attr:`zero_copy`; else in Python)."""
        fds = _raw_fds(self.stream) if self.zero_copy else None
        done = 0
        while done < length:
            n = min(MAX_DATA, length - done)
            if fds is None:
                chunk = os.pread(fd, n, offset + done)
                if len(chunk) != n:
                    raise ProtocolError("the file shrank while it was being sent")
                self.send_data(chunk)
            else:
                header = _HEADER.pack(KIND_DATA, n)
                try:
                    self.stream.write(header)
                    _sendfile_exact(fds[1], fd, offset + done, n, self.stream)
                except (OSError, ValueError, TimeoutError) as exc:
                    self.close()  # a partly sent frame: the stream is unusable
                    if isinstance(exc, _Shrank):
                        raise ProtocolError("the file shrank while it was being sent") from None
                    raise TransportError(f"connection to the {self.peer} broke while sending: {exc}") from exc
                self.stats.data_sent += _HEADER.size + n
            done += n
            if on_bytes is not None:
                on_bytes(n)

    def recv_file_data(self, fd: int, offset: int, room: int, timeout: float | None = -1.0) -> int:
        """Receive one data frame into file ``fd`` at ``offset``; return its length.

        The frame may carry at most ``room`` bytes (what the ``file`` message announced and has
        not arrived yet): a longer or empty frame is refused before anything is written. With
        :attr:`zero_copy`, the payload is spliced from the stream into the file in the kernel.
        """
        wait = self.timeout if timeout == -1.0 else timeout
        fds = _raw_fds(self.stream) if self.zero_copy else None
        if fds is None:
            data = self.recv_data(wait)
            if len(data) > room:
                raise ProtocolError("more data than announced")
            if not data:
                raise ProtocolError("empty data frame")
            view = memoryview(data)
            done = 0
            while view:
                n = os.pwrite(fd, view, offset + done)
                view = view[n:]
                done += n
            return done
        _, kind, length = self._read_header(wait)  # zero copy: never with frame MACs
        if kind == KIND_CONTROL:
            payload = self._read(length, wait) if length else b""
            self.stats.control_received += _HEADER.size + length
            raise self._not_data(payload)
        if length > room:
            raise ProtocolError("more data than announced")
        if not length:
            raise ProtocolError("empty data frame")
        with self._mid_frame(wait, f"receiving file data from the {self.peer} failed"):
            _splice_exact(fds[0], fd, offset, length, wait)
        self.stats.data_received += _HEADER.size + length
        return length

    def recv(self, *expected: str, timeout: float | None = -1.0) -> dict[str, Any]:
        """Receive one control message; with ``expected`` types, anything else is an error.

        An ``error`` message from the agent is raised as :class:`AgentError`.
        """
        wait = self.timeout if timeout == -1.0 else timeout
        kind, payload = self._recv_frame(wait)
        if kind != KIND_CONTROL:
            raise ProtocolError("unexpected data frame (no file transfer in progress)")
        msg = validate(decode(payload), sender=self.peer)
        if msg["type"] == "error" and "error" not in expected:
            raise agent_error(msg)
        if expected and msg["type"] not in expected:
            raise ProtocolError(f"expected {' or '.join(expected)}, got {msg['type']!r}")
        return msg

    def recv_data(self, timeout: float | None = -1.0) -> bytes:
        wait = self.timeout if timeout == -1.0 else timeout
        kind, payload = self._recv_frame(wait)
        if kind != KIND_DATA:
            raise self._not_data(payload)
        return payload

    def peer_gone(self) -> bool:
        """Whether the peer has closed its end (checked without consuming anything)."""
        if self.closed:
            return True
        try:
            return self.stream.peer_gone()
        except OSError:
            return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.stream.close()
            except OSError:
                pass


# --- Zero-copy file data ------------------------------------------------------------------------

#: ``os.splice`` exists (Linux, Python >= 3.10): otherwise file data always goes through Python.
ZERO_COPY = hasattr(os, "splice") and hasattr(os, "sendfile")
_FALLBACK_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class _Shrank(OSError):
    pass


def _wait_fd(fd: int, *, write: bool, deadline: float | None) -> None:
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        raise TimeoutError("the peer stopped reading" if write else "no data from the peer")
    if write:
        select.select([], [fd], [], left)
    else:
        select.select([fd], [], [], left)


def _sendfile_exact(out_fd: int, in_fd: int, offset: int, count: int, stream: Any) -> None:
    """``count`` bytes of ``in_fd`` at ``offset`` into ``out_fd`` (a pipe or socket, maybe
    non-blocking) with ``sendfile``; falls back to ``pread`` + write where the kernel refuses."""
    timeout = getattr(stream, "write_timeout", 120.0)
    deadline = time.monotonic() + timeout
    end = offset + count
    while offset < end:
        try:
            n = os.sendfile(out_fd, in_fd, offset, end - offset)
        except BlockingIOError:
            _wait_fd(out_fd, write=True, deadline=deadline)
            continue
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
            while offset < end:  # this kernel cannot sendfile here: copy the rest in Python
                chunk = os.pread(in_fd, min(CHUNK, end - offset), offset)
                if not chunk:
                    raise _Shrank() from None
                stream.write(chunk)
                offset += len(chunk)
            return
        if n == 0:
            raise _Shrank()
        offset += n
        deadline = time.monotonic() + timeout


def _splice_exact(in_fd: int, out_fd: int, offset: int, count: int, timeout: float | None) -> None:
    """Move exactly ``count`` bytes from the stream ``in_fd`` into file ``out_fd`` at ``offset``
    with ``splice`` (directly from a pipe; from a socket through a pipe of our own)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    if stat.S_ISFIFO(os.fstat(in_fd).st_mode):
        end = offset + count
        while offset < end:
            try:
                n = os.splice(in_fd, out_fd, end - offset, offset_dst=offset, flags=flags)
            except BlockingIOError:
                _wait_fd(in_fd, write=False, deadline=deadline)
                continue
            if n == 0:
                raise EOFError
            offset += n
            if timeout is not None:
                deadline = time.monotonic() + timeout
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        left = count
        while left:
            try:
                n = os.splice(in_fd, w, min(left, 1 << 16), flags=flags)
            except BlockingIOError:
                _wait_fd(in_fd, write=False, deadline=deadline)
                continue
            if n == 0:
                raise EOFError
            k = 0
            while k < n:
                k += os.splice(r, out_fd, n - k, offset_dst=offset + k, flags=os.SPLICE_F_MOVE)
            offset += n
            left -= n
            if timeout is not None:
                deadline = time.monotonic() + timeout
    finally:
        os.close(r)
        os.close(w)


# --- Authentication -----------------------------------------------------------------------------


def _auth_mac(secret: bytes, label: str, a: str, b: str) -> str:
    return hmac.new(secret, f"pycriu-auth-v1|{label}|{a}|{b}".encode(), hashlib.sha256).hexdigest()


def _session_key(secret: bytes, a: str, b: str) -> bytes:
    return hmac.new(secret, f"pycriu-session-v1|{a}|{b}".encode(), hashlib.sha256).digest()


def agent_authenticate(channel: Channel, secret: bytes | None, agent_name: str, *,
                       failure_delay: float = 0.2, timeout: float = 30.0) -> None:
    """Agent side: send ``welcome``; with a secret, run the challenge-response and switch to
    MAC'd frames. Raises :class:`AuthenticationError` (after telling the client) on failure."""
    nonce = secrets.token_hex(32) if secret is not None else None
    channel.send({"type": "welcome", "protocol": PROTOCOL_VERSION, "agent": agent_name,
                  "auth": "secret" if secret is not None else "none", "nonce": nonce})
    if secret is None:
        return
    assert nonce is not None
    try:
        msg = channel.recv("auth", timeout=timeout)
    except (ProtocolError, AgentError) as exc:
        _refuse(channel, failure_delay)
        raise AuthenticationError(f"client did not authenticate: {exc}") from None
    theirs = msg["nonce"]
    if not _HEX64.fullmatch(theirs) or not _HEX64.fullmatch(msg["mac"]) or not hmac.compare_digest(
            msg["mac"], _auth_mac(secret, "client", nonce, theirs)):
        _refuse(channel, failure_delay)
        raise AuthenticationError("client failed authentication (wrong shared secret)")
    channel.send({"type": "auth-ok", "mac": _auth_mac(secret, "agent", nonce, theirs)})
    channel.enable_mac(_session_key(secret, nonce, theirs))


def _refuse(channel: Channel, delay: float) -> None:
    time.sleep(delay)  # slow down guessing
    try:
        channel.send({"type": "error", "code": "auth-failed", "message": "authentication failed"})
    except (TransportError, ProtocolError):
        pass


def client_authenticate(channel: Channel, secret: bytes | None, *, require: bool) -> dict[str, Any]:
    """Client side: read ``welcome``; answer the challenge when the agent asks for a secret.

    ``require``: refuse an agent that does not authenticate with the secret (plain TCP, where
    nothing else vouches for the peer). Returns the welcome message.
    """
    welcome = channel.recv("welcome", timeout=30.0)
    if welcome["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(f"agent speaks protocol {welcome['protocol']}, this pycriu speaks {PROTOCOL_VERSION}")
    if welcome["auth"] == "none":
        if require:
            raise AuthenticationError(
                "the agent does not authenticate itself: refusing plain TCP without a shared secret",
                hint="start the agent with --secret-file (or use TLS with client certificates)")
        return welcome
    if welcome["auth"] != "secret":
        raise ProtocolError(f"agent offers unknown authentication {welcome['auth']!r}")
    if secret is None:
        raise AuthenticationError("the agent requires a shared secret and none was given",
                                  hint="pass secret=... (pycriu migrate --secret-file FILE)")
    nonce_a = welcome["nonce"]
    if not isinstance(nonce_a, str) or not _HEX64.fullmatch(nonce_a):
        raise ProtocolError("agent sent a malformed challenge")
    nonce_b = secrets.token_hex(32)
    channel.send({"type": "auth", "nonce": nonce_b, "mac": _auth_mac(secret, "client", nonce_a, nonce_b)})
    try:
        reply = channel.recv("auth-ok")
    except AgentError as exc:
        raise AuthenticationError(f"the agent refused the shared secret ({exc.code})",
                                  hint="check that both sides use the same secret") from None
    if not hmac.compare_digest(reply["mac"], _auth_mac(secret, "agent", nonce_a, nonce_b)):
        raise AuthenticationError("the agent failed to prove it knows the shared secret")
    channel.enable_mac(_session_key(secret, nonce_a, nonce_b))
    return welcome


# --- File streaming -----------------------------------------------------------------------------


@dataclass
class Limits:
    """What a receiver accepts in one session."""

    max_file_size: int = 64 << 30
    max_total_bytes: int = 256 << 30
    max_files: int = 100_000
    min_free_bytes: int = 64 << 20
    received_files: int = 0
    received_bytes: int = 0
    names: set[tuple[str, str]] = field(default_factory=set)
    linked: set[tuple[int, int]] = field(default_factory=set)  # (st_dev, st_ino) of hard-linked files
    linked_bytes: int = 0  # their sizes: counted in files-ok, not against max_total_bytes


def _check_ranges(ranges: Any, size: int) -> list[tuple[int, int]]:
    if not isinstance(ranges, list) or len(ranges) > 1_000_000:
        raise ProtocolError("file ranges must be a list")
    out: list[tuple[int, int]] = []
    end = 0
    for item in ranges:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise ProtocolError("each file range must be [offset, length]")
        off, length = item
        if off < end or length <= 0 or off + length > size:
            raise ProtocolError("file ranges must be sorted, non-overlapping and inside the file")
        out.append((off, length))
        end = off + length
    return out


def send_file(channel: Channel, dir_name: str, path: str | os.PathLike[str], *,
              name: str | None = None, ranges: list[tuple[int, int]] | None = None,
              pattern: re.Pattern[str] = IMAGE_NAME, on_bytes: Callable[[int], None] | None = None) -> int:
    """Stream one regular file (or only ``ranges`` of it, as a sparse file); return payload bytes.

    The file is read in chunks straight from where CRIU wrote it: no temporary copy.
    """
    name = check_image_name(name or Path(path).name, pattern)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"{path} is not a regular file")
        size = st.st_size
        spans = [(0, size)] if ranges is None else ranges
        msg: dict[str, Any] = {"type": "file", "dir": dir_name, "name": name, "size": size}
        if ranges is not None:
            msg["ranges"] = [[o, n] for o, n in ranges]
        channel.send(msg)
        sent = 0
        for off, length in spans:
            channel.send_file_data(fd, off, length, on_bytes=on_bytes)
            sent += length
        channel.stats.files_sent += 1
        return sent
    finally:
        os.close(fd)


def link_file(channel: Channel, dir_name: str, path: str | os.PathLike[str], *, name: str | None = None,
              pattern: re.Pattern[str] = IMAGE_NAME) -> int:
    """Hand one regular file to a peer on this host by name (``file-link``): it hard-links it
    into its directory, so nothing is copied and the page cache that holds it is shared.
    Returns the file's size."""
    name = check_image_name(name or Path(path).name, pattern)
    path = os.path.abspath(path)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"{path} is not a regular file")
    channel.send({"type": "file-link", "dir": dir_name, "name": name, "size": st.st_size, "path": path})
    channel.stats.files_sent += 1
    return st.st_size


def _claim(msg: Mapping[str, Any], limits: Limits, pattern: re.Pattern[str]) -> tuple[str, tuple[str, str]]:
    """The checked name of a file the peer sends (``file`` or ``file-link``), and its key: not
    sent before in this session, and within the session's file count."""
    name = check_image_name(msg["name"], pattern)
    key = (str(msg["dir"]), name)
    if key in limits.names:
        raise ProtocolError(f"file {name!r} was already sent")
    if limits.received_files + 1 > limits.max_files:
        raise ProtocolError(f"session exceeds its limit of {limits.max_files} files")
    return name, key


def _check_room(name: str, size: int, payload: int, limits: Limits, dir_fd: int) -> None:
    """Before ``payload`` bytes of a file of ``size`` bytes are written into ``dir_fd``: the size
    limits of one file and of the session, and the free space."""
    if size < 0 or size > limits.max_file_size:
        raise ProtocolError(f"file {name!r} of {size} bytes exceeds the limit of {limits.max_file_size}")
    if limits.received_bytes + payload > limits.max_total_bytes:
        raise ProtocolError(f"session exceeds its limit of {limits.max_total_bytes} bytes")
    vfs = os.statvfs(dir_fd)
    if payload + limits.min_free_bytes > vfs.f_bavail * vfs.f_frsize:
        raise ProtocolError(f"not enough free space for {name!r} ({payload} bytes)")


def _name_taken(name: str) -> ProtocolError:
    return ProtocolError(f"refused file name {name!r}: it already exists (or is a link)")


@contextmanager
def _new_file(name: str, dir_fd: int) -> Iterator[int]:
    """Create ``name`` in ``dir_fd`` with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (an existing file or
    symlink of that name is refused) and yield its descriptor; it is closed at the end of the
    block, and the file removed if the block failed."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except FileExistsError:
        raise _name_taken(name) from None
    except OSError as exc:
        raise ProtocolError(f"cannot create {name!r}: {exc.strerror}") from None
    ok = False
    try:
        yield fd
        ok = True
    finally:
        os.close(fd)
        if not ok:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass


def accept_link(msg: Mapping[str, Any], dir_fd: int, limits: Limits, *, pattern: re.Pattern[str] = IMAGE_NAME) -> int:
    """Take the file of one ``file-link`` message into ``dir_fd`` by hard link; return its size.

    Only an agent on the source's host accepts these (it is given ``--same-host``). The name is
    checked as for ``file``; the path must be absolute and name a regular file of the stated
    size, and what got linked must be that very file (a path swapped for a symbolic link in
    between is refused and the link removed). Where the kernel will not link it (another mount
    of the filesystem, a filesystem without hard links, a policy), the file is copied instead,
    by the kernel (``copy_file_range``), from the same checked file."""
    name, key = _claim(msg, limits, pattern)
    path, size = msg["path"], msg["size"]
    if not os.path.isabs(path):
        raise ProtocolError(f"file-link {name!r}: {path!r} is not an absolute path")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ProtocolError(f"file-link {name!r}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise ProtocolError(f"file-link {name!r}: {path} is not a regular file of {size} bytes")
    try:
        os.link(path, name, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise _name_taken(name) from None
    except OSError:
        _copy_checked(path, st, name, dir_fd, limits)
    else:
        got = os.lstat(name, dir_fd=dir_fd)
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(got.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            raise ProtocolError(f"file-link {name!r}: {path} changed while it was linked")
        limits.linked.add((got.st_dev, got.st_ino))
        limits.linked_bytes += size
    limits.names.add(key)
    limits.received_files += 1
    return size


def _kernel_copy(src: int, dst: int, size: int, what: str) -> None:
    """Copy ``size`` bytes between two file descriptors inside the kernel: ``copy_file_range``
    (within a filesystem), else ``sendfile`` (across filesystems, where the first refuses)."""
    done = 0
    use_range = True
    while done < size:
        if use_range:
            try:
                n = os.copy_file_range(src, dst, size - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_range = False
                continue
        else:
            os.lseek(dst, done, os.SEEK_SET)
            n = os.sendfile(dst, src, done, size - done)
        if n <= 0:
            raise ProtocolError(f"{what} shrank while it was copied")
        done += n


def _copy_checked(path: str, st: os.stat_result, name: str, dir_fd: int, limits: Limits) -> None:
    """The fallback of :func:`accept_link`: copy ``path`` (still the file ``st`` describes), with
    the checks of a received file."""
    size = st.st_size
    _check_room(name, size, size, limits, dir_fd)
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"file-link {name!r}: cannot open {path}: {exc.strerror}") from None
    try:
        now = os.fstat(src)
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size):
            raise ProtocolError(f"file-link {name!r}: {path} changed while it was copied")
        with _new_file(name, dir_fd) as dst:
            try:
                _kernel_copy(src, dst, size, f"file-link {name!r}: {path}")
            except OSError as exc:
                raise ProtocolError(f"file-link {name!r}: copying {path} failed: {exc.strerror}") from None
    finally:
        os.close(src)
    limits.received_bytes += size


def receive_file(channel: Channel, msg: Mapping[str, Any], dir_fd: int, limits: Limits, *,
                 pattern: re.Pattern[str] = IMAGE_NAME, timeout: float | None = -1.0) -> int:
    """Receive the data of one ``file`` message into ``dir_fd``; return the payload bytes.

    Validates the name, the size against ``limits`` and the free space, then creates the file
    with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (an existing file or symlink of that name is refused).
    On any error the partial file is removed and the error raised.
    """
    name, key = _claim(msg, limits, pattern)
    size = msg["size"]
    ranges = msg.get("ranges")
    spans = [(0, size)] if ranges is None else _check_ranges(ranges, size)
    payload = sum(n for _, n in spans)
    _check_room(name, size, payload, limits, dir_fd)
    with _new_file(name, dir_fd) as fd:
        limits.names.add(key)
        if ranges is not None:
            os.ftruncate(fd, size)  # sparse: the gaps stay holes and use no disk
        for off, length in spans:
            done = 0
            while done < length:
                try:
                    done += channel.recv_file_data(fd, off + done, length - done, timeout)
                except ProtocolError as exc:
                    if type(exc) is not ProtocolError:
                        raise
                    raise ProtocolError(f"file {name!r}: {exc.message}") from None
    limits.received_files += 1
    limits.received_bytes += payload
    channel.stats.files_received += 1
    return payload


def send_files(channel: Channel, dir_name: str, paths: Iterable[tuple[str, str | os.PathLike[str],
               list[tuple[int, int]] | None]], *, pattern: re.Pattern[str] = IMAGE_NAME,
               on_bytes: Callable[[int], None] | None = None,
               on_file: Callable[[str], None] | None = None, link: bool = False) -> tuple[int, int]:
    """Send ``(name, path, ranges)`` files then ``files-done``; wait for ``files-ok``.

    ``on_file(name)`` runs after each file was sent (it may send a control message). With
    ``link`` (a peer on this host and filesystem), whole files go by hard link, not by copy.
    Returns (files, bytes: payload sent, plus the sizes of linked files)."""
    count = total = 0
    for name, path, ranges in paths:
        if link and ranges is None:
            total += link_file(channel, dir_name, path, name=name, pattern=pattern)
        else:
            total += send_file(channel, dir_name, path, name=name, ranges=ranges, pattern=pattern,
                               on_bytes=on_bytes)
        count += 1
        if on_file is not None:
            on_file(name)
    channel.send({"type": "files-done", "dir": dir_name, "count": count, "bytes": total})
    reply = channel.recv("files-ok")
    if reply["count"] != count or reply["bytes"] != total:
        raise ProtocolError(f"the peer received {reply['count']} files / {reply['bytes']} bytes, "
                            f"sent {count} / {total}")
    return count, total


def finite(value: float) -> float:
    """JSON has no NaN/inf: clamp a float for a message."""
    return value if math.isfinite(value) else 0.0
