"""The agent protocol's framed channel: control and data frames over a stream (pipes, a socket,
TLS), their MACs in shared-secret sessions without TLS, and file data moved by ``sendfile`` /
``splice`` where nothing needs to see it (see :mod:`.protocol` for the wire format)."""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import select
import stat
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import AuthenticationError, ProtocolError, TransportError
from .messages import agent_error, decode, encode, validate

KIND_CONTROL = 1
KIND_DATA = 2
_HEADER = struct.Struct(">BI")
MAC_SIZE = 32
MAX_CONTROL = 1 << 20
MAX_DATA = 1 << 20
_FRAME_LIMITS = {KIND_CONTROL: MAX_CONTROL, KIND_DATA: MAX_DATA}
CHUNK = 1 << 20

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
            said = self._why_peer_stopped()
            self.close()  # a partly sent frame: the stream is unusable
            if said is not None:
                raise said from exc
            raise TransportError(f"connection to the {self.peer} broke while sending: {exc}") from exc
        return sum(len(p) for p in parts)

    def _why_peer_stopped(self) -> Exception | None:
        """After a send failed: the agent's ``error`` frame, if it sent one before it hung up
        (an agent refuses a file mid-stream, e.g. for want of space, and closes)."""
        if self.peer != "agent" or self.closed:
            return None
        try:
            kind, payload = self._recv_frame(1.0)
            msg = decode(payload) if kind == KIND_CONTROL else None
            if isinstance(msg, dict) and msg.get("type") == "error":
                return agent_error(validate(msg, sender="agent"))
        except Exception:  # noqa: BLE001 - nothing readable: the plain transport error stands
            return None
        return None

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
