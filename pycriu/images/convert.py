"""CRIU messages to and from the JSON-able dicts ``crit decode`` prints (and ``crit encode`` reads).

The rules follow what ``crit`` shows, so that its users and scripts find the same dicts:

- only fields that are set appear; enums by name; nested messages as dicts; repeated as lists;
- ``bytes`` in base64 (``base64.encodebytes``: lines of 76 characters, a newline at the end),
  but for the ``(criu).conv = "unix_name"`` fields (Unix socket names), which are quoted-printable;
- with ``pretty``, numbers are shown as CRIU's field options say: ``hex`` as ``"0x..."`` (nested
  messages of a hex field too), ``dev`` as ``"major:minor"``, ``flags`` as ``"A | B | 0x..."``,
  ``dict`` as a name (task states, socket families...), ``ipadd`` as an address string.

:func:`from_dict` reads both forms back (a string where a number is expected is parsed by those
same rules, else as an integer literal), so ``from_dict(to_dict(m, pretty))`` equals ``m``.
"""

from __future__ import annotations

import base64
import binascii
import os
import quopri
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message

from .errors import ImageError
from .schema import field_options

__all__ = ["to_dict", "from_dict", "FLAG_MAPS", "DICT_MAPS", "ConversionError"]


class ConversionError(ImageError):
    """A dict does not fit the message it is converted to (names the field and what was wrong)."""


_INTS = frozenset({FD.TYPE_FIXED64, FD.TYPE_FIXED32, FD.TYPE_SFIXED64, FD.TYPE_SFIXED32, FD.TYPE_INT64,
                   FD.TYPE_UINT64, FD.TYPE_SINT64, FD.TYPE_INT32, FD.TYPE_UINT32, FD.TYPE_SINT32})

#: The bit names of each ``(criu).flags`` map: the kernel's and CRIU's constants.
FLAG_MAPS: dict[str, tuple[tuple[str, int], ...]] = {
    "mmap.prot": (("PROT_READ", 0x1), ("PROT_WRITE", 0x2), ("PROT_EXEC", 0x4)),
    "mmap.flags": (("MAP_SHARED", 0x1), ("MAP_PRIVATE", 0x2), ("MAP_DROPPABLE", 0x08), ("MAP_ANON", 0x20),
                   ("MAP_GROWSDOWN", 0x100)),
    # CRIU's vma_area status bits (criu/include/image.h)
    "mmap.status": (("VMA_AREA_NONE", 0), ("VMA_AREA_REGULAR", 1 << 0), ("VMA_AREA_STACK", 1 << 1),
                    ("VMA_AREA_VSYSCALL", 1 << 2), ("VMA_AREA_VDSO", 1 << 3), ("VMA_AREA_HEAP", 1 << 5),
                    ("VMA_FILE_PRIVATE", 1 << 6), ("VMA_FILE_SHARED", 1 << 7), ("VMA_ANON_SHARED", 1 << 8),
                    ("VMA_ANON_PRIVATE", 1 << 9), ("VMA_AREA_SYSVIPC", 1 << 10), ("VMA_AREA_SOCKET", 1 << 11),
                    ("VMA_AREA_VVAR", 1 << 12), ("VMA_AREA_AIORING", 1 << 13), ("VMA_AREA_MEMFD", 1 << 14),
                    ("VMA_AREA_SHSTK", 1 << 15), ("VMA_AREA_UPROBES", 1 << 17), ("VMA_UNSUPP", 1 << 31)),
    "rfile.flags": (("O_WRONLY", 0o1), ("O_RDWR", 0o2), ("O_CREAT", 0o100), ("O_EXCL", 0o200),
                    ("O_NOCTTY", 0o400), ("O_TRUNC", 0o1000), ("O_APPEND", 0o2000), ("O_NONBLOCK", 0o4000),
                    ("O_DSYNC", 0o10000), ("FASYNC", 0o20000), ("O_DIRECT", 0o40000), ("O_LARGEFILE", 0o100000),
                    ("O_DIRECTORY", 0o200000), ("O_NOFOLLOW", 0o400000), ("O_NOATIME", 0o1000000),
                    ("O_CLOEXEC", 0o2000000)),
    "pmap.flags": (("PE_PARENT", 1 << 0), ("PE_LAZY", 1 << 1), ("PE_PRESENT", 1 << 2)),
    "seals.flags": (("F_SEAL_SEAL", 0x1), ("F_SEAL_SHRINK", 0x2), ("F_SEAL_GROW", 0x4), ("F_SEAL_WRITE", 0x8),
                    ("F_SEAL_FUTURE_WRITE", 0x10)),
}

#: ``(criu).dict`` maps: ``{map: {field name: {value: name}}}``.
DICT_MAPS: dict[str, dict[str, dict[int, str]]] = {
    "gen": {"task_state": {1: "Alive", 3: "Zombie", 6: "Stopped"}},
    "sk": {
        "family": {1: "UNIX", 2: "INET", 10: "INET6", 16: "NETLINK", 17: "PACKET"},
        "type": {1: "STREAM", 2: "DGRAM", 3: "RAW", 5: "SEQPACKET", 10: "PACKET"},
        "state": {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
                  7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN"},
        "proto": {0: "IP", 6: "TCP", 17: "UDP", 136: "UDPLITE"},
    },
}

_MINORBITS = 20  # the kernel's dev_t encoding of new-format device numbers


#: a field's descriptor: protobuf's pure-Python ``FieldDescriptor`` or the upb backend's twin
Field = Any


def _repeated(field: Field) -> bool:
    # protobuf 6 deprecates ``label`` for ``is_repeated``; 4.x has only ``label``
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else getattr(field, "label", 0) == FD.LABEL_REPEATED


def _flags_text(value: int, bits: tuple[tuple[str, int], ...]) -> str:
    names = [n for n, b in bits if value & b]
    rest = value & ~sum(b for _, b in bits)
    if rest:
        names.append(f"0x{rest:x}")
    return " | ".join(names)


def _flags_value(text: str, bits: tuple[tuple[str, int], ...]) -> int:
    if text == "":
        return 0
    table = dict(bits)
    return sum(table[p] if p in table else int(p, 0) for p in (x.strip() for x in text.split("|")))


def _encode_bytes(field: Field, value: bytes) -> str:
    if field_options(field).conv == "unix_name":
        return quopri.encodestring(value).decode("ascii", "replace")
    return base64.encodebytes(value).decode("ascii")


def _decode_bytes(field: Field, value: object) -> bytes:
    if not isinstance(value, str):
        raise ConversionError(f"{field.full_name}: expected a string of encoded bytes, got {value!r}")
    try:
        if field_options(field).conv == "unix_name":
            return quopri.decodestring(value.encode("latin-1"))
        return base64.decodebytes(value.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ConversionError(f"{field.full_name}: not base64: {e}") from None


def _scalar(field: Field, value: Any, pretty: bool, hexed: bool) -> Any:
    t = field.type
    if t == FD.TYPE_BYTES:
        return _encode_bytes(field, value)
    if t == FD.TYPE_ENUM:
        v = field.enum_type.values_by_number.get(value)
        return v.name if v is not None else value
    if t in _INTS:
        if not pretty:
            return int(value)
        opts = field_options(field)
        if hexed or opts.hex:
            return f"0x{value:x}"
        if opts.dev:
            if opts.odev:
                return f"{os.major(value)}:{os.minor(value)}"
            return f"{value >> _MINORBITS}:{value & ((1 << _MINORBITS) - 1)}"
        if opts.flags:
            bits = FLAG_MAPS.get(opts.flags)
            return _flags_text(value, bits) if bits is not None else f"0x{value:x}"
        if opts.dict:
            return DICT_MAPS.get(opts.dict, {}).get(field.name, {}).get(value, int(value))
        return int(value)
    if t == FD.TYPE_BOOL:
        return bool(value)
    if t == FD.TYPE_STRING:
        return str(value)
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return float(value)
    raise ConversionError(f"{field.full_name}: unsupported protobuf type {t}")


def _address(words: list[int]) -> str:
    if len(words) == 1:
        return IPv4Address(socket.ntohl(words[0])).compressed
    v = 0
    for w in words[:4]:
        v = (v << 32) | socket.ntohl(w)
    return IPv6Address(v).compressed


def to_dict(msg: Message, pretty: bool = False, _hex: bool = False) -> dict[str, Any]:
    """``msg`` as the dict ``crit decode`` shows (``--pretty``: ``pretty=True``)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        hexed = _hex or field_options(field).hex
        repeated = _repeated(field)
        if field.type == FD.TYPE_MESSAGE:
            out[field.name] = [to_dict(v, pretty, hexed) for v in value] if repeated else \
                to_dict(value, pretty, hexed)
        elif repeated:
            if pretty and field_options(field).ipadd:
                out[field.name] = [_address(list(value))]
            else:
                out[field.name] = [_scalar(field, v, pretty, hexed) for v in value]
        else:
            out[field.name] = _scalar(field, value, pretty, hexed)
    return out


def _number(field: Field, value: Any) -> Any:
    t = field.type
    if t == FD.TYPE_BYTES:
        return _decode_bytes(field, value)
    if t == FD.TYPE_ENUM:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        v = field.enum_type.values_by_name.get(value)
        if v is None:
            names = ", ".join(field.enum_type.values_by_name)
            raise ConversionError(f"{field.full_name}: {value!r} is not one of {names}")
        return v.number
    if t in _INTS:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConversionError(f"{field.full_name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        opts = field_options(field)
        try:
            if opts.dev and ":" in value:
                major, minor = (int(x) for x in value.split(":"))
                return os.makedev(major, minor) if opts.odev else major << _MINORBITS | minor
            if opts.flags and opts.flags in FLAG_MAPS:
                return _flags_value(value, FLAG_MAPS[opts.flags])
            if opts.dict:
                by_name = {n: v for v, n in DICT_MAPS.get(opts.dict, {}).get(field.name, {}).items()}
                if value in by_name:
                    return by_name[value]
            return int(value, 0)
        except (KeyError, ValueError):
            raise ConversionError(f"{field.full_name}: {value!r} is not a number this field takes") from None
    if t == FD.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ConversionError(f"{field.full_name}: expected true or false, got {value!r}")
        return value
    if t == FD.TYPE_STRING:
        if not isinstance(value, str):
            raise ConversionError(f"{field.full_name}: expected a string, got {value!r}")
        return value
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return float(value)
    raise ConversionError(f"{field.full_name}: unsupported protobuf type {t}")


def _words(field: Field, text: str) -> list[int]:
    try:
        addr = ip_address(text)
    except ValueError:
        raise ConversionError(f"{field.full_name}: {text!r} is not an IP address") from None
    if addr.version == 4:
        return [socket.htonl(int(addr))]
    v = int(addr)
    return [socket.htonl((v >> (32 * i)) & 0xFFFFFFFF) for i in (3, 2, 1, 0)]


def from_dict(d: dict[str, Any], msg: Message) -> Message:
    """Fill ``msg`` from ``d`` (either form of :func:`to_dict`) and return it."""
    if not isinstance(d, dict):
        raise ConversionError(f"{msg.DESCRIPTOR.full_name}: expected an object, got {d!r}")
    fields = msg.DESCRIPTOR.fields_by_name
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ConversionError(f"{msg.DESCRIPTOR.full_name} has no field {', '.join(map(repr, unknown))}")
    for field in msg.DESCRIPTOR.fields:
        if field.name not in d:
            continue
        value = d[field.name]
        if _repeated(field):
            if not isinstance(value, list):
                raise ConversionError(f"{field.full_name}: expected a list, got {value!r}")
            target = getattr(msg, field.name)
            if field.type == FD.TYPE_MESSAGE:
                for v in value:
                    from_dict(v, target.add())
            elif value and isinstance(value[0], str) and field_options(field).ipadd:
                target.extend(_words(field, value[0]))
            else:
                target.extend(_number(field, v) for v in value)
        elif field.type == FD.TYPE_MESSAGE:
            sub = getattr(msg, field.name)
            sub.SetInParent()  # present even when empty, as in the image
            from_dict(value, sub)
        else:
            try:
                setattr(msg, field.name, _number(field, value))
            except ImageError:
                raise
            except (TypeError, ValueError) as e:  # out of range for the field's type
                raise ConversionError(f"{field.full_name}: {e}") from None
    return msg
