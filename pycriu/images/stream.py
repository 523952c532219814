"""One image file as a stream: its magics, then its entries (:mod:`pycriu.images.formats`).

The readers of every other module start here: the image's type comes from its magic, never from
its name, and a file of another type is refused with the name of what it is.
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

__all__ = ["MAGIC", "SERVICE", "where", "binary", "read_magic", "image_type", "read_messages"]

MAGIC = struct.Struct("<I")
#: images whose first magic is the service one (CRIU's own bookkeeping, not the tree's state)
SERVICE = frozenset({"STATS", "IRMAP_CACHE"})


def where(f: IO[bytes]) -> str:
    return str(getattr(f, "name", "image"))


def binary(f: IO[Any]) -> IO[bytes]:
    """``f``, or the binary file under it when it was opened in text mode (zdtm's hooks do)."""
    return getattr(f, "buffer", f) if isinstance(f, io.TextIOBase) else f


def read_magic(f: IO[bytes]) -> tuple[str, Format]:
    head = f.read(4)
    if len(head) != 4:
        raise ImageError(f"{where(f)}: {len(head)} bytes: too short to be a CRIU image")
    (value,) = MAGIC.unpack(head)
    if value in (magic.IMG_COMMON, magic.IMG_SERVICE):
        second = f.read(4)
        if len(second) != 4:
            raise ImageError(f"{where(f)}: truncated after its first magic")
        (value,) = MAGIC.unpack(second)
    name = magic.by_val.get(value)
    if name is None or name == "RAW_IMAGE":
        raise MagicException(value, where(f))
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ImageError(f"{where(f)}: a {name} image, which pycriu cannot decode "
                         "(a raw image, or a type newer than this list)")
    return name, fmt


def image_type(f: IO[bytes]) -> str:
    """The image's type name (``"CORE"``), read from its magic; ``f`` is left after it."""
    return read_magic(f)[0]




def read_messages(path: str | os.PathLike[str], expect: str | None = None) -> Iterator[Message]:
    """The entries of the image at ``path`` as protobuf messages (payloads skipped); with
    ``expect`` (``"PSTREE"``), an image of another type is an :class:`ImageError`."""
    with open(path, "rb") as f:
        name, fmt = read_magic(f)
        if expect is not None and name != expect:
            raise ImageError(f"{path}: a {name} image, expected {expect}")
        yield from fmt.messages(f)
