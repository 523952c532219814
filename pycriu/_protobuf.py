"""The little protobuf decoding pycriu needs to read CRIU's images (stats, pagemaps).

CRIU's image files are a magic header followed by size-prefixed protobuf messages; pycriu reads a
handful of their fields, so a generic wire-format decoder is enough (no generated code, no
protobuf dependency).
"""

from __future__ import annotations

from typing import Any


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return ``(value, next position)``."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes) -> dict[int, Any]:
    """Decode one message into ``{field number: value}``: varints as ``int``, length-delimited
    fields (strings, nested messages) and fixed-width fields as ``bytes``. A repeated field keeps
    its last value."""
    out: dict[int, Any] = {}
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num], pos = varint(buf, pos)
        elif wire == 2:
            size, pos = varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated length-delimited field")
            out[num] = buf[pos:pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            out[num] = buf[pos:pos + width]
            pos += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out
