"""Which filesystem a path is on (from ``/proc/self/mountinfo``): the lazy flows keep images in a
memory filesystem, and CRIU keeps its kernel-probe cache only on one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["filesystem_of", "mounts", "MEMORY_FILESYSTEMS"]

#: Filesystems whose files live in RAM: nothing written there reaches a disk.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this mount namespace, in mount order (later ones on top)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        out.append((fields[4].replace("\\040", " "), fields[fields.index("-") + 1]))
    return out


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem ``path`` is on (from ``/proc/self/mountinfo``), or ``""``."""
    target = os.path.realpath(path)
    best, fstype = -1, ""
    for mount, kind in mounts():
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # the last of equal mounts is the one on top
            best, fstype = len(mount), kind
    return fstype
