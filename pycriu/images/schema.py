"""CRIU's image schemas as protobuf message classes, built from CRIU's own ``.proto`` files.

``csrc/build_images.py`` compiles every ``images/*.proto`` of the CRIU source into one
``FileDescriptorSet`` (``_generated/criu.binpb``) when pycriu is built. Here it is loaded into a
private descriptor pool: the classes come from the protobuf library's message factory, and
CRIU's own Python module (which registers the same file names in protobuf's default pool) can be
imported beside ours. CRIU's field options (``(criu).hex``, ``.flags``, ``.ipadd``, ``.dev``,
``.dict``, ``.conv``: how ``crit`` shows a field) are read once per field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["CriuFieldOptions", "field_options", "message_class", "pool", "source"]

_GENERATED = Path(__file__).with_name("_generated")


@functools.cache
def pool() -> descriptor_pool.DescriptorPool:
    """The private pool holding every CRIU image schema (built on first use)."""
    path = _GENERATED / "criu.binpb"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImportError(f"{path} is missing: pycriu was built without CRIU's image schemas "
                          "(rebuild it with the CRIU source at $PYCRIU_CRIU_SRC; csrc/build_images.py)") from None
    p = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        p.Add(f)
    return p


def source() -> str:
    """Which CRIU source the schemas came from (``criu-4.2.1``)."""
    return (_GENERATED / "SOURCE").read_text().strip()


@functools.cache
def message_class(name: str) -> type[Message]:
    """The class of CRIU message ``name`` (``"core_entry"``); ``KeyError`` if there is none."""
    return message_factory.GetMessageClass(descriptor(name))


def descriptor(name: str) -> Descriptor:
    try:
        return pool().FindMessageTypeByName(name)
    except KeyError:
        raise KeyError(f"CRIU's images have no message {name!r}") from None


@dataclass(frozen=True)
class CriuFieldOptions:
    """CRIU's ``(criu)`` options of one field (opts.proto's ``CRIU_Opts``)."""

    hex: bool = False
    ipadd: bool = False
    flags: str = ""
    dev: bool = False
    odev: bool = False
    dict: str = ""
    conv: str = ""


_NONE = CriuFieldOptions()


@functools.cache
def _options_reader() -> tuple[type[Message], Any]:
    p = pool()
    options = message_factory.GetMessageClass(p.FindMessageTypeByName("google.protobuf.FieldOptions"))
    return options, p.FindExtensionByName("criu")


@functools.cache
def field_options(field: FieldDescriptor) -> CriuFieldOptions:
    """The ``(criu)`` options of ``field`` (all unset for most fields)."""
    raw = field.GetOptions().SerializeToString()
    if not raw:
        return _NONE
    options, ext = _options_reader()
    parsed = options.FromString(raw)
    if not parsed.HasExtension(ext):
        return _NONE
    o = parsed.Extensions[ext]
    return CriuFieldOptions(hex=o.hex, ipadd=o.ipadd, flags=o.flags, dev=o.dev, odev=o.odev, dict=o.dict,
                            conv=o.conv)
