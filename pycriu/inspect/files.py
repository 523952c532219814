"""What an open file of a checkpoint is, in one line: a path, a pipe, a socket's addresses.

A task's fds (``fdinfo-N.img``) point to entries of ``files.img`` by id; this module turns one
such entry into the words a user of ``ls -l /proc/PID/fd`` or ``ss`` expects (``tcp
127.0.0.1:8080 LISTEN``, ``unix @name``, ``pipe:[1234]``, ``/var/log/x.log (deleted)``).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from ..images.checkpoint import Checkpoint, Entry
from ..images.convert import DICT_MAPS

__all__ = ["FileInfo", "describe", "enum_name"]

_SK = DICT_MAPS["sk"]
_REMAP = {0: "linked", 1: "deleted", 2: "procfs"}
_NS_CFLAGS = {0x00020000: "mnt", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc",
              0x10000000: "user", 0x20000000: "pid", 0x40000000: "net", 0x00000080: "time"}


@dataclass(frozen=True)
class FileInfo:
    """One open file: its CRIU type (``REG``, ``PIPE``, ``INETSK``...), a one-line
    description, and for sockets the parts tools want (``family``, ``proto``, ``state``,
    ``local``, ``remote``)."""

    type: str
    description: str
    socket: dict[str, Any] | None = None


def enum_name(entry: Entry, field: str) -> str:
    """The name of an enum field's value (``REG``), or its number when the schema has none."""
    value = getattr(entry, field)
    enum = entry.DESCRIPTOR.fields_by_name[field].enum_type
    found = enum.values_by_number.get(value) if enum is not None else None
    return found.name if found is not None else str(value)


def _addr(family: int, words: Any, port: int) -> str:
    if family == socket.AF_INET6:
        text = socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *list(words)[:4])) if len(words) >= 4 else "::"
        return f"[{text}]:{port}"
    text = socket.inet_ntop(socket.AF_INET, struct.pack("<I", words[0])) if len(words) else "0.0.0.0"
    return f"{text}:{port}"


def _inet(isk: Entry) -> FileInfo:
    family = _SK["family"].get(isk.family, str(isk.family))
    proto = _SK["proto"].get(isk.proto, str(isk.proto)).lower()
    state = _SK["state"].get(isk.state, str(isk.state))
    local = _addr(isk.family, isk.src_addr, isk.src_port)
    remote = _addr(isk.family, isk.dst_addr, isk.dst_port)
    desc = f"{proto}{'6' if isk.family == socket.AF_INET6 else ''} {local}"
    if state != "LISTEN" and isk.dst_port:
        desc += f" -> {remote}"
    desc += f" {state}"
    return FileInfo("INETSK", desc, {"family": family, "proto": proto, "state": state, "local": local,
                                     "remote": remote, "ino": isk.ino})


def _unix_name(name: bytes) -> str:
    if not name:
        return ""
    if name[:1] == b"\0":
        return "@" + name[1:].decode("utf-8", "backslashreplace")
    return name.decode("utf-8", "backslashreplace")


def _unix(usk: Entry) -> FileInfo:
    kind = _SK["type"].get(usk.type, str(usk.type)).lower()
    state = _SK["state"].get(usk.state, str(usk.state))
    name = _unix_name(usk.name)
    desc = f"unix {kind} {name or '(unnamed)'} {state}"
    if usk.peer:
        desc += f" peer {usk.peer}"
    return FileInfo("UNIXSK", desc, {"family": "UNIX", "proto": kind, "state": state, "local": name,
                                     "remote": str(usk.peer) if usk.peer else "", "ino": usk.ino})


def describe(ckpt: Checkpoint, f: Entry, remaps: dict[int, int] | None = None) -> FileInfo:
    """The :class:`FileInfo` of ``files.img`` entry ``f``."""
    kind = enum_name(f, "type")
    if f.HasField("reg"):
        how = (remaps or {}).get(f.reg.id)
        return FileInfo(kind, f.reg.name + (f" ({_REMAP.get(how, how)})" if how is not None else ""))
    if f.HasField("pipe"):
        return FileInfo(kind, f"pipe:[{f.pipe.pipe_id}]")
    if f.HasField("fifo"):
        path = ckpt.files.get(f.fifo.regf_id)
        name = path.reg.name if path is not None and path.HasField("reg") else ""
        return FileInfo(kind, f"fifo {name} pipe:[{f.fifo.pipe_id}]".replace("  ", " "))
    if f.HasField("isk"):
        return _inet(f.isk)
    if f.HasField("usk"):
        return _unix(f.usk)
    if f.HasField("nsf"):
        return FileInfo(kind, f"{_NS_CFLAGS.get(f.nsf.ns_cflag, 'ns')} namespace {f.nsf.ns_id}")
    if f.HasField("psk"):
        return FileInfo(kind, f"packet socket (protocol {f.psk.protocol:#x}, ifindex {f.psk.ifindex})",
                        {"family": "PACKET", "proto": f"{f.psk.protocol:#x}", "state": "", "local": "",
                         "remote": "", "ino": 0})
    if f.HasField("nlsk"):
        return FileInfo(kind, f"netlink socket (protocol {f.nlsk.protocol})",
                        {"family": "NETLINK", "proto": str(f.nlsk.protocol), "state": "", "local": "",
                         "remote": "", "ino": f.nlsk.ino})
    if f.HasField("memfd"):
        return FileInfo(kind, f"memfd (inode {f.memfd.inode_id})")
    if f.HasField("ext"):
        return FileInfo(kind, f"external file {f.ext.id}")
    return FileInfo(kind, f"{kind.lower()} {f.id}")
