"""CRIU's checkpoint images as data: read and write every image type from Python.

A checkpoint is a directory of image files. Each (but ``inventory.img``) starts with a common or
service magic, then the image type's magic, then its entries (:mod:`pycriu.images.formats`).
The schemas are CRIU's own ``.proto`` files, compiled when pycriu is built
(:mod:`pycriu.images.schema`), so this module reads what the provisioned CRIU writes.

Two views:

- dicts, exactly as ``crit decode`` prints them (:mod:`pycriu.images.convert`), through the
  names CRIU's own Python module has: :func:`load`, :func:`loads`, :func:`dump`, :func:`dumps`,
  :func:`info` and :class:`MagicException`; scripts written for it (and ``crit``) run on ours.
- typed protobuf messages, for code: :func:`read_messages`.

Decoding then encoding an image gives back the same bytes. Page contents (``pages-*.img``) are
raw memory, not entries: they are not read here.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from typing import IO, Any

from google.protobuf.message import Message

from . import magic
from .errors import ImageError, MagicException
from .formats import FORMATS, Format

__all__ = ["load", "loads", "dump", "dumps", "info", "read_messages", "image_type", "ImageError",
           "MagicException", "magic"]

_MAGIC = struct.Struct("<I")
#: images whose first magic is the service one (CRIU's own bookkeeping, not the tree's state)
_SERVICE = frozenset({"STATS", "IRMAP_CACHE"})


def _where(f: IO[bytes]) -> str:
    return str(getattr(f, "name", "image"))


def _binary(f: IO[Any]) -> IO[bytes]:
    """``f``, or the binary file under it when it was opened in text mode (zdtm's hooks do)."""
    return getattr(f, "buffer", f) if isinstance(f, io.TextIOBase) else f


def _read_magic(f: IO[bytes]) -> tuple[str, Format]:
    head = f.read(4)
    if len(head) != 4:
        raise ImageError(f"{_where(f)}: {len(head)} bytes: too short to be a CRIU image")
    (value,) = _MAGIC.unpack(head)
    if value in (magic.IMG_COMMON, magic.IMG_SERVICE):
        second = f.read(4)
        if len(second) != 4:
            raise ImageError(f"{_where(f)}: truncated after its first magic")
        (value,) = _MAGIC.unpack(second)
    name = magic.by_val.get(value)
    if name is None or name == "RAW_IMAGE":
        raise MagicException(value, _where(f))
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ImageError(f"{_where(f)}: a {name} image, which pycriu cannot decode "
                         "(a raw image, or a type newer than this list)")
    return name, fmt


def image_type(f: IO[bytes]) -> str:
    """The image's type name (``"CORE"``), read from its magic; ``f`` is left after it."""
    return _read_magic(f)[0]


def load(f: IO[bytes], pretty: bool = False, nopl: bool = False) -> dict[str, Any]:
    """``{"magic": NAME, "entries": [...]}`` of the image ``f`` (a binary file), as ``crit
    decode`` (``pretty``: ``--pretty``; ``nopl``: payloads shown by size only)."""
    f = _binary(f)
    name, fmt = _read_magic(f)
    return {"magic": name, "entries": fmt.load(f, pretty, nopl)}


def loads(data: bytes, pretty: bool = False, nopl: bool = False) -> dict[str, Any]:
    """:func:`load` of bytes."""
    return load(io.BytesIO(data), pretty, nopl)


def info(f: IO[bytes]) -> dict[str, Any]:
    """``{"magic": NAME, "count": N}``: the image's type and how many entries it holds."""
    f = _binary(f)
    name, fmt = _read_magic(f)
    return {"magic": name, "count": fmt.count(f)}


def dump(img: dict[str, Any], f: IO[bytes]) -> None:
    """Write ``img`` (what :func:`load` returns) to the binary file ``f``, as CRIU writes it."""
    f = _binary(f)
    if not isinstance(img, dict) or "magic" not in img or "entries" not in img:
        raise ImageError("an image dict has 'magic' and 'entries'")
    name = img["magic"]
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None or name not in magic.by_name:
        raise ImageError(f"magic {name!r}: not an image type pycriu can write")
    if name != "INVENTORY":
        f.write(_MAGIC.pack(magic.IMG_SERVICE if name in _SERVICE else magic.IMG_COMMON))
    f.write(_MAGIC.pack(magic.by_name[name]))
    entries = img["entries"]
    if not isinstance(entries, list):
        raise ImageError("'entries' must be a list")
    fmt.dump(entries, f)


def dumps(img: dict[str, Any]) -> bytes:
    """:func:`dump` to bytes."""
    out = io.BytesIO()
    dump(img, out)
    return out.getvalue()


def read_messages(path: str | os.PathLike[str], expect: str | None = None) -> Iterator[Message]:
    """The entries of the image at ``path`` as protobuf messages (payloads skipped); with
    ``expect`` (``"PSTREE"``), an image of another type is an :class:`ImageError`."""
    with open(path, "rb") as f:
        name, fmt = _read_magic(f)
        if expect is not None and name != expect:
            raise ImageError(f"{path}: a {name} image, expected {expect}")
        yield from fmt.messages(f)
