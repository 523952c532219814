"""CRIU's image magics (``criu/include/magic.h``), by name and by value.

Names are those of ``crit`` and CRIU's Python module: ``magic.h``'s ``NAME_MAGIC`` without the
``_MAGIC`` suffix (``INVENTORY``, ``CORE``, ``PAGEMAP``). Several names share a value (aliases
such as ``PAGES_OLD``, and every raw image's 0); :data:`by_val` keeps the canonical one."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["by_name", "by_val", "IMG_COMMON", "IMG_SERVICE", "RAW", "RAW_PREFIXES", "is_raw"]


def _load() -> dict[str, int]:
    path = Path(__file__).with_name("_generated") / "magic.json"
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImportError(f"{path} is missing: pycriu was built without CRIU's magic.h "
                          "(csrc/build_images.py)") from None
    return {(k[:-len("_MAGIC")] if k.endswith("_MAGIC") else k): int(v) for k, v in table.items()}


#: name -> value (every name of magic.h)
by_name: dict[str, int] = _load()
IMG_COMMON = by_name["IMG_COMMON"]
IMG_SERVICE = by_name["IMG_SERVICE"]
RAW = by_name["RAW_IMAGE"]

# value -> name: an alias never hides the name it aliases (magic.h defines the real one first)
by_val: dict[int, str] = {}
for _name, _value in by_name.items():
    if _name.startswith("CRTOOLS_IMAGES"):
        continue
    by_val.setdefault(_value, _name)

#: Files of an images directory CRIU writes raw, without magics (``magic.h``'s aliases of
#: ``RAW_IMAGE_MAGIC``: page contents, the output of ``ip ... save`` and ``iptables-save``, a tar
#: of a tmpfs, conntrack dumps): no image reader decodes them, crit's neither. By file name, as
#: ``criu/image-desc.c`` names them.
RAW_PREFIXES = ("pages-", "ifaddr-", "route-", "route6-", "rule-", "iptables-", "ip6tables-", "nftables-",
                "tmpfs-", "netns-ct-", "netns-exp-")


def is_raw(name: str) -> bool:
    """Whether the file ``name`` of an images directory is one CRIU writes raw."""
    return name.startswith(RAW_PREFIXES) or name.endswith(".tar.gz.img")
