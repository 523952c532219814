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
from typing import IO, Any

from . import magic
from .errors import ImageError, MagicException
from .formats import FORMATS
from .stream import MAGIC, SERVICE, binary, image_type, read_magic, read_messages

__all__ = ["load", "loads", "dump", "dumps", "info", "read_messages", "image_type", "ImageError",
           "MagicException", "magic"]


def load(f: IO[bytes], pretty: bool = False, nopl: bool = False) -> dict[str, Any]:
    """``{"magic": NAME, "entries": [...]}`` of the image ``f`` (a binary file), as ``crit
    decode`` (``pretty``: ``--pretty``; ``nopl``: payloads shown by size only)."""
    f = binary(f)
    name, fmt = read_magic(f)
    return {"magic": name, "entries": fmt.load(f, pretty, nopl)}


def loads(data: bytes, pretty: bool = False, nopl: bool = False) -> dict[str, Any]:
    """:func:`load` of bytes."""
    return load(io.BytesIO(data), pretty, nopl)


def info(f: IO[bytes]) -> dict[str, Any]:
    """``{"magic": NAME, "count": N}``: the image's type and how many entries it holds."""
    f = binary(f)
    name, fmt = read_magic(f)
    return {"magic": name, "count": fmt.count(f)}


def dump(img: dict[str, Any], f: IO[bytes]) -> None:
    """Write ``img`` (what :func:`load` returns) to the binary file ``f``, as CRIU writes it."""
    f = binary(f)
    if not isinstance(img, dict) or "magic" not in img or "entries" not in img:
        raise ImageError("an image dict has 'magic' and 'entries'")
    name = img["magic"]
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None or name not in magic.by_name:
        raise ImageError(f"magic {name!r}: not an image type pycriu can write")
    if name != "INVENTORY":
        f.write(MAGIC.pack(magic.IMG_SERVICE if name in SERVICE else magic.IMG_COMMON))
    f.write(MAGIC.pack(magic.by_name[name]))
    entries = img["entries"]
    if not isinstance(entries, list):
        raise ImageError("'entries' must be a list")
    fmt.dump(entries, f)


def dumps(img: dict[str, Any]) -> bytes:
    """:func:`dump` to bytes."""
    out = io.BytesIO()
    dump(img, out)
    return out.getvalue()
