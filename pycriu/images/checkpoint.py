"""One checkpoint: a CRIU images directory, read on demand.

:class:`Checkpoint` reads each image the first time something asks for it, as typed messages,
and keeps it; the views above it (:mod:`pycriu.inspect`, :mod:`pycriu.images.memory`) ask for
what they show and nothing else. It knows CRIU's naming of the per-task images (``core-PID``,
``mm-PID``, ``ids-PID``, ``fdinfo-FILES_ID``) and where an incremental dump's parent lives.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ImageError
from .stream import read_messages

__all__ = ["Checkpoint", "Entry"]

#: one entry of an image: a CRIU protobuf message (its classes are made at run time from the
#: schema, so static typing sees no fields)
Entry = Any


class Checkpoint:
    """The images in ``directory`` (what ``criu dump -D`` wrote).

    Every accessor raises :class:`~pycriu.images.ImageError` naming the image when an image the
    answer needs is missing or corrupt; ``has`` says beforehand whether an image exists."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory)
        if not self.path.is_dir():
            raise ImageError(f"{self.path}: not a directory (give the directory criu dump -D wrote)")
        if not (self.path / "inventory.img").is_file():
            raise ImageError(f"{self.path}: no inventory.img, so not a CRIU images directory "
                             "(a dump that failed, or the work dir instead of the images dir?)")
        self._cache: dict[str, list[Entry]] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def entries(self, name: str, expect: str) -> list[Entry]:
        """Every entry of image ``name`` (``"pstree.img"``), which must be of type ``expect``."""
        cached = self._cache.get(name)
        if cached is None:
            path = self.path / name
            if not path.is_file():
                raise ImageError(f"{path}: missing (the checkpoint is incomplete)")
            cached = self._cache[name] = list(read_messages(path, expect))
        return cached

    def entry(self, name: str, expect: str) -> Entry:
        """The first (usually only) entry of image ``name``."""
        found = self.entries(name, expect)
        if not found:
            raise ImageError(f"{self.path / name}: empty (a {expect} image holds one entry)")
        return found[0]

    # -- the tree ---------------------------------------------------------------------------

    @cached_property
    def inventory(self) -> Entry:
        return self.entry("inventory.img", "INVENTORY")

    @cached_property
    def pstree(self) -> list[Entry]:
        """The processes, parents before children, as ``pstree.img`` lists them (pids are those
        of the tree's own PID namespace when it has one)."""
        if not self.has("pstree.img") and any(self.path.glob("pagemap-*.img")):
            raise ImageError(f"{self.path}: a pre-dump's images (memory only, no process tree): inspect the dump "
                             "built on it, which reads these pages through its parent link")
        return self.entries("pstree.img", "PSTREE")

    def core(self, tid: int) -> Entry:
        """The core image of thread ``tid`` (a process's main thread has its pid)."""
        return self.entry(f"core-{tid}.img", "CORE")

    def ids(self, pid: int) -> Entry:
        """Which shared objects (files table, mm, namespaces) process ``pid`` uses."""
        return self.entry(f"ids-{pid}.img", "IDS")

    def mm(self, pid: int) -> Entry:
        return self.entry(f"mm-{pid}.img", "MM")

    def fs(self, pid: int) -> Entry:
        return self.entry(f"fs-{pid}.img", "FS")

    def fdinfo(self, pid: int) -> list[Entry]:
        """The fds of process ``pid``: ``fdinfo-<files_id>.img``, shared by the processes that
        share one files table."""
        return self.entries(f"fdinfo-{self.ids(pid).files_id}.img", "FDINFO")

    @cached_property
    def files(self) -> dict[int, Entry]:
        """Every file the tree holds (``files.img``), by id: what fds and mappings refer to."""
        if not self.has("files.img"):
            return {}
        return {f.id: f for f in self.entries("files.img", "FILES")}

    def optional(self, name: str, expect: str) -> list[Entry]:
        """The entries of an image CRIU writes only when there is something to say."""
        return self.entries(name, expect) if self.has(name) else []

    # -- incremental dumps ------------------------------------------------------------------

    @cached_property
    def parent(self) -> Checkpoint | None:
        """The checkpoint this one builds on (its ``parent`` link: a pre-dump's images), or
        ``None``. Pages marked "in parent" are read there."""
        link = self.path / "parent"
        if not link.is_symlink() and not link.is_dir():
            return None
        target = link.resolve()
        if not target.is_dir():
            raise ImageError(f"{link}: points to {target}, which is gone (the pre-dump images were removed)")
        return Checkpoint(target)

    def chain(self) -> list[Checkpoint]:
        """This checkpoint, then its parent, its parent's parent... (a loop is an error)."""
        out: list[Checkpoint] = [self]
        seen = {self.path.resolve()}
        while (parent := out[-1].parent) is not None:
            key = parent.path.resolve()
            if key in seen:
                raise ImageError(f"{out[-1].path}/parent: the parent links form a loop")
            seen.add(key)
            out.append(parent)
        return out

    # -- CRIU's own figures -----------------------------------------------------------------

    def stats(self, kind: str = "dump") -> Entry | None:
        """The dump's (``"dump"``) or a restore's (``"restore"``) statistics, when CRIU wrote
        them into this directory."""
        name = f"stats-{kind}"
        if not self.has(name):
            return None
        entry = self.entry(name, "STATS")
        return getattr(entry, kind) if entry.HasField(kind) else None

    @cached_property
    def taken_at(self) -> float:
        """When the dump ended (the time of its last file, ``stats-dump``, else the inventory),
        in seconds since the epoch: what a rate between two checkpoints divides by."""
        for name in ("stats-dump", "inventory.img"):
            try:
                return (self.path / name).stat().st_mtime
            except FileNotFoundError:
                continue
        raise ImageError(f"{self.path}: no inventory.img")
