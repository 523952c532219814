"""How each CRIU image file is laid out after its magic.

Most images are a sequence of entries, each a 32-bit length and one protobuf message of the
image's type. Some entries are followed by raw data (a payload) whose size the entry gives: the
bytes of a pipe or a socket queue, a TCP connection's queues, System V IPC contents, BPF map
data. Two images differ: ``pagemap`` starts with a ``pagemap_head``, and ``ghost-file`` is one
entry followed by either the file's contents or a sequence of chunks with their own data.

Readers check every length against what the file still holds, so a truncated or hostile image
raises :class:`~pycriu.images.errors.ImageError` instead of reading garbage or allocating
without bound.
"""

from __future__ import annotations

import base64
import io
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from google.protobuf.message import DecodeError, Message

from .convert import from_dict, to_dict
from .errors import ImageError
from .schema import message_class

__all__ = ["Format", "FORMATS", "read_message", "write_message"]

_LEN = struct.Struct("<I")
#: no single CRIU message comes near this; a larger length is a corrupt image
MAX_MESSAGE = 64 << 20


#: lengths up to this are read and checked afterwards; above it, checked against the file first
_CHECK_ABOVE = 1 << 20


def _remaining(f: IO[bytes]) -> int | None:
    try:
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return end - here
    except (OSError, io.UnsupportedOperation):
        return None


def read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    """``n`` bytes of ``f`` or :class:`ImageError` (a large length beyond the file's end is
    refused before anything is read: no buffer of an absurd size is allocated)."""
    if n < 0:
        raise ImageError(f"{what}: negative length {n}")
    left = _remaining(f) if n > _CHECK_ABOVE else None  # two seeks a message cost 40 % of a read
    if left is not None and n > left:
        raise ImageError(f"{what}: {n} bytes announced at offset {f.tell()}, only {left} left (truncated image)")
    data = f.read(n)
    if len(data) != n:
        raise ImageError(f"{what}: {n} bytes announced, only {len(data)} left (truncated image)")
    return data


def read_message(f: IO[bytes], name: str) -> Message | None:
    """The next length-prefixed message of type ``name``, or ``None`` at the end of the file."""
    head = f.read(4)
    if not head:
        return None
    if len(head) != 4:
        raise ImageError(f"{name}: truncated length ({len(head)} of 4 bytes)")
    (size,) = _LEN.unpack(head)
    if size > MAX_MESSAGE:
        raise ImageError(f"{name}: message length {size} at offset {f.tell() - 4} is absurd (corrupt image)")
    data = read_exact(f, size, name)
    msg = message_class(name)()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ImageError(f"{name}: message at offset {f.tell() - size - 4} does not parse: {e}") from None
    return msg


def write_message(f: IO[bytes], msg: Message) -> None:
    data = msg.SerializeToString()
    f.write(_LEN.pack(len(data)))
    f.write(data)


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ImageError(f"{what}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.decodebytes(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise ImageError(f"{what}: not base64: {e}") from None


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def human(n: float) -> str:
    """``crit``'s size notation for a skipped payload: ``4KB``, ``1.5MB``."""
    for unit in ("", "K", "M", "G", "T", "P", "E", "Z"):
        if n < 1024:
            return f"{int(n)}{unit}B" if int(n) == n else f"{n:.1f}{unit}B"
        n /= 1024
    return f"{n:.1f}YB"


@dataclass(frozen=True)
class Payload:
    """Raw data after an entry: ``size(entry)`` bytes, padded to ``align``, as base64 text."""

    size: Callable[[Message], int]
    align: int = 1

    def read(self, f: IO[bytes], entry: Message, what: str) -> Any:
        n = self.size(entry)
        data = read_exact(f, n, what)
        read_exact(f, _round_up(n, self.align) - n, what)
        return _b64(data)

    def skip(self, f: IO[bytes], entry: Message, what: str) -> int:
        n = self.size(entry)
        read_exact(f, _round_up(n, self.align), what)
        return n

    def write(self, f: IO[bytes], entry: Message, extra: Any, what: str) -> None:
        data = _unb64(extra, what)
        n = self.size(entry)
        if len(data) < n:
            raise ImageError(f"{what}: the entry announces {n} bytes of data, extra holds {len(data)}")
        f.write(data[:n])
        f.write(b"\0" * (_round_up(n, self.align) - n))


class TcpQueues(Payload):
    """A TCP connection's receive and send queues: ``{"inq": ..., "outq": ...}``."""

    def __init__(self) -> None:
        super().__init__(lambda e: e.inq_len + e.outq_len)  # type: ignore[attr-defined]

    def read(self, f: IO[bytes], entry: Message, what: str) -> Any:
        return {"inq": _b64(read_exact(f, entry.inq_len, what)),  # type: ignore[attr-defined]
                "outq": _b64(read_exact(f, entry.outq_len, what))}  # type: ignore[attr-defined]

    def write(self, f: IO[bytes], entry: Message, extra: Any, what: str) -> None:
        if not isinstance(extra, dict):
            raise ImageError(f"{what}: extra must be {{'inq': ..., 'outq': ...}}")
        f.write(_unb64(extra.get("inq", ""), what))
        f.write(_unb64(extra.get("outq", ""), what))


class SemaphoreSet(Payload):
    """A System V semaphore set: ``nsems`` 16-bit values (padded to 8 bytes), as a list."""

    def __init__(self) -> None:
        super().__init__(lambda e: 2 * e.nsems, 8)  # type: ignore[attr-defined]

    def read(self, f: IO[bytes], entry: Message, what: str) -> Any:
        n = self.size(entry)
        data = read_exact(f, n, what)
        read_exact(f, _round_up(n, 8) - n, what)
        return list(struct.unpack(f"<{n // 2}H", data))

    def write(self, f: IO[bytes], entry: Message, extra: Any, what: str) -> None:
        nsems = entry.nsems  # type: ignore[attr-defined]
        if not isinstance(extra, list) or len(extra) != nsems:
            raise ImageError(f"{what}: extra must list the {nsems} semaphore values")
        data = struct.pack(f"<{nsems}H", *extra)
        f.write(data + b"\0" * (_round_up(len(data), 8) - len(data)))


class MessageQueue(Payload):
    """A System V message queue: ``qnum`` times an ``ipc_msg`` and its text (padded to 8
    bytes), as a list alternating the message's dict and its base64 text."""

    def __init__(self) -> None:
        super().__init__(lambda e: 0)

    def _messages(self, f: IO[bytes], entry: Message, what: str, keep: bool) -> tuple[list[Any], int]:
        out: list[Any] = []
        total = 0
        for _ in range(entry.qnum):  # type: ignore[attr-defined]
            msg = read_message(f, "ipc_msg")
            if msg is None:
                raise ImageError(f"{what}: the queue ends before its {entry.qnum} messages")  # type: ignore[attr-defined]
            size = msg.msize  # type: ignore[attr-defined]
            data = read_exact(f, _round_up(size, 8), what)
            total += msg.ByteSize() + size
            if keep:
                out += [to_dict(msg), _b64(data[:size])]
        return out, total

    def read(self, f: IO[bytes], entry: Message, what: str) -> Any:
        return self._messages(f, entry, what, True)[0]

    def skip(self, f: IO[bytes], entry: Message, what: str) -> int:
        return self._messages(f, entry, what, False)[1]

    def write(self, f: IO[bytes], entry: Message, extra: Any, what: str) -> None:
        if not isinstance(extra, list) or len(extra) % 2:
            raise ImageError(f"{what}: extra must alternate message dicts and their base64 text")
        for i in range(0, len(extra), 2):
            msg = from_dict(extra[i], message_class("ipc_msg")())
            write_message(f, msg)
            data = _unb64(extra[i + 1], what)[:msg.msize]  # type: ignore[attr-defined]
            f.write(data + b"\0" * (_round_up(len(data), 8) - len(data)))


@dataclass(frozen=True)
class Format:
    """One image type: its entries' message, and what follows each (if anything)."""

    entry: str
    payload: Payload | None = None
    #: the first entry's message when it differs (pagemap's ``pagemap_head``)
    head: str | None = None

    def messages(self, f: IO[bytes]) -> Iterator[Message]:
        """The entries' messages, payloads skipped (a typed view for pycriu's own readers)."""
        for msg, _ in self._entries(f, keep=False):
            yield msg

    def _entries(self, f: IO[bytes], keep: bool) -> Iterator[tuple[Message, Any]]:
        name = self.head or self.entry
        while True:
            msg = read_message(f, name)
            if msg is None:
                return
            name = self.entry
            extra: Any = None
            if self.payload is not None:
                what = f"{self.entry} payload"
                extra = self.payload.read(f, msg, what) if keep else self.payload.skip(f, msg, what)
            yield msg, extra

    def load(self, f: IO[bytes], pretty: bool = False, nopl: bool = False) -> list[dict[str, Any]]:
        out = []
        for msg, extra in self._entries(f, keep=not nopl):
            d = to_dict(msg, pretty)
            if self.payload is not None:
                d["extra"] = f"... <{human(extra)}>" if nopl else extra
            out.append(d)
        return out

    def count(self, f: IO[bytes]) -> int:
        n = sum(1 for _ in self._entries(f, keep=False))
        return n - 1 if self.head and n else n

    def dump(self, entries: list[dict[str, Any]], f: IO[bytes]) -> None:
        name = self.head or self.entry
        for i, d in enumerate(entries):
            d = dict(d)
            extra = d.pop("extra", None)
            msg = from_dict(d, message_class(name)())
            write_message(f, msg)
            name = self.entry
            if self.payload is not None:
                if extra is None:
                    raise ImageError(f"{self.entry} entry {i} has no 'extra' (its payload)")
                self.payload.write(f, msg, extra, f"{self.entry} entry {i}")


class GhostFile(Format):
    """``ghost-file``: a ``ghost_file_entry``, then the deleted file's contents, either whole
    (``extra`` of the entry) or as ``ghost_chunk_entry`` chunks with their own ``extra``."""

    def __init__(self) -> None:
        super().__init__("ghost_file_entry")

    def _entries(self, f: IO[bytes], keep: bool) -> Iterator[tuple[Message, Any]]:
        head = read_message(f, "ghost_file_entry")
        if head is None:
            raise ImageError("ghost_file_entry: the image has no entry")
        if not head.chunks:  # type: ignore[attr-defined]
            rest = f.read()
            yield head, (_b64(rest) if keep else len(rest))
            return
        yield head, None
        while (chunk := read_message(f, "ghost_chunk_entry")) is not None:
            data = read_exact(f, chunk.len, "ghost chunk")  # type: ignore[attr-defined]
            yield chunk, (_b64(data) if keep else len(data))

    def load(self, f: IO[bytes], pretty: bool = False, nopl: bool = False) -> list[dict[str, Any]]:
        out = []
        for msg, extra in self._entries(f, keep=not nopl):
            d = to_dict(msg, pretty)
            if extra is not None and not nopl:
                d["extra"] = extra
            out.append(d)
        return out

    def dump(self, entries: list[dict[str, Any]], f: IO[bytes]) -> None:
        if not entries:
            raise ImageError("ghost-file needs its ghost_file_entry")
        first = dict(entries[0])
        extra = first.pop("extra", None)
        head = from_dict(first, message_class("ghost_file_entry")())
        write_message(f, head)
        if not head.chunks:  # type: ignore[attr-defined]
            f.write(_unb64(extra or "", "ghost file contents"))
            return
        for i, d in enumerate(entries[1:], 1):
            d = dict(d)
            data = _unb64(d.pop("extra", ""), f"ghost chunk {i}")
            write_message(f, from_dict(d, message_class("ghost_chunk_entry")()))
            f.write(data)


def _bytes(name: str) -> Callable[[Message], int]:
    return lambda e: getattr(e, name)


#: image name (as :mod:`pycriu.images.magic` names it) -> its layout
FORMATS: dict[str, Format] = {
    "INVENTORY": Format("inventory_entry"), "CORE": Format("core_entry"), "IDS": Format("task_kobj_ids_entry"),
    "CREDS": Format("creds_entry"), "UTSNS": Format("utsns_entry"), "TIMENS": Format("timens_entry"),
    "PIDNS": Format("pidns_entry"), "IPC_VAR": Format("ipc_var_entry"), "FS": Format("fs_entry"),
    "GHOST_FILE": GhostFile(), "MM": Format("mm_entry"), "CGROUP": Format("cgroup_entry"),
    "TCP_STREAM": Format("tcp_stream_entry", TcpQueues()), "STATS": Format("stats_entry"),
    "PAGEMAP": Format("pagemap_entry", head="pagemap_head"), "PSTREE": Format("pstree_entry"),
    "REG_FILES": Format("reg_file_entry"), "NS_FILES": Format("ns_file_entry"),
    "EVENTFD_FILE": Format("eventfd_file_entry"), "EVENTPOLL_FILE": Format("eventpoll_file_entry"),
    "EVENTPOLL_TFD": Format("eventpoll_tfd_entry"), "SIGNALFD": Format("signalfd_entry"),
    "TIMERFD": Format("timerfd_entry"), "INOTIFY_FILE": Format("inotify_file_entry"),
    "INOTIFY_WD": Format("inotify_wd_entry"), "FANOTIFY_FILE": Format("fanotify_file_entry"),
    "FANOTIFY_MARK": Format("fanotify_mark_entry"), "VMAS": Format("vma_entry"), "PIPES": Format("pipe_entry"),
    "FIFO": Format("fifo_entry"), "SIGACT": Format("sa_entry"), "NETLINK_SK": Format("netlink_sk_entry"),
    "REMAP_FPATH": Format("remap_file_path_entry"), "MNTS": Format("mnt_entry"),
    "TTY_FILES": Format("tty_file_entry"), "TTY_INFO": Format("tty_info_entry"),
    "TTY_DATA": Format("tty_data_entry"), "RLIMIT": Format("rlimit_entry"), "TUNFILE": Format("tunfile_entry"),
    "EXT_FILES": Format("ext_file_entry"), "IRMAP_CACHE": Format("irmap_cache_entry"),
    "FILE_LOCKS": Format("file_lock_entry"), "FDINFO": Format("fdinfo_entry"), "UNIXSK": Format("unix_sk_entry"),
    "INETSK": Format("inet_sk_entry"), "PACKETSK": Format("packet_sock_entry"), "ITIMERS": Format("itimer_entry"),
    "POSIX_TIMERS": Format("posix_timer_entry"), "NETDEV": Format("net_device_entry"),
    "PIPES_DATA": Format("pipe_data_entry", Payload(_bytes("bytes"))),
    "FIFO_DATA": Format("pipe_data_entry", Payload(_bytes("bytes"))),
    "SK_QUEUES": Format("sk_packet_entry", Payload(_bytes("length"))),
    # the segment's contents follow its entry, unless they went to the page images (in_pagemaps)
    "IPCNS_SHM": Format("ipc_shm_entry", Payload(lambda e: 0 if e.in_pagemaps else e.size, 4)),  # type: ignore[attr-defined]
    "IPCNS_SEM": Format("ipc_sem_entry", SemaphoreSet()),
    "IPCNS_MSG": Format("ipc_msg_entry", MessageQueue()),
    "NETNS": Format("netns_entry"), "USERNS": Format("userns_entry"), "SECCOMP": Format("seccomp_entry"),
    "AUTOFS": Format("autofs_entry"), "FILES": Format("file_entry"), "CPUINFO": Format("cpuinfo_entry"),
    "MEMFD_FILE": Format("memfd_file_entry"), "MEMFD_INODE": Format("memfd_inode_entry"),
    "BPFMAP_FILE": Format("bpfmap_file_entry"),
    "BPFMAP_DATA": Format("bpfmap_data_entry", Payload(lambda e: e.keys_bytes + e.values_bytes)),  # type: ignore[attr-defined]
    "APPARMOR": Format("apparmor_entry"),
}
