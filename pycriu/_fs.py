"""Which filesystem a path is on (from ``/proc/self/mountinfo``): the lazy flows keep images in a
memory filesystem, and CRIU keeps its kernel-probe cache only on one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

__all__ = ["filesystem_of", "mounts", "mountinfo", "Mount", "MEMORY_FILESYSTEMS"]

#: Filesystems whose files live in RAM: nothing written there reaches a disk.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class Mount(NamedTuple):
    """One line of ``/proc/self/mountinfo`` (proc(5)): what pycriu reads of it."""

    mountpoint: str
    root: str  #: the mounted directory, within its filesystem
    fstype: str
    super_options: tuple[str, ...]  #: for cgroup v1: the hierarchy's controllers, among others


def mountinfo() -> list[Mount]:
    """This mount namespace's mounts, in mount order (later ones on top); [] if unreadable."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        out.append(Mount(fields[4].replace("\\040", " "), fields[3], fields[sep + 1],
                         tuple(fields[sep + 3].split(","))))
    return out


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this mount namespace, in mount order (later ones on top)."""
    return [(m.mountpoint, m.fstype) for m in mountinfo()]


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem ``path`` is on (from ``/proc/self/mountinfo``), or ``""``."""
    target = os.path.realpath(path)
    best, fstype = -1, ""
    for mount, kind in mounts():
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # the last of equal mounts is the one on top
            best, fstype = len(mount), kind
    return fstype
