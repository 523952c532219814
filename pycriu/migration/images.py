"""What a CRIU images directory holds: which files to send, how big they are, and which pages the
pagemaps describe (read from the pagemap metadata only; page contents are never read here)."""

from __future__ import annotations

import os
import stat
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import MEMORY_FILESYSTEMS, filesystem_of
from .protocol import IMAGE_NAME

__all__ = ["ImageFile", "list_images", "dir_usage", "Pagemap", "read_pagemap", "pagemaps", "PAGE_SIZE",
           "non_lazy_ranges", "stopped_tasks", "filesystem_of", "memory_dir", "MEMORY_FILESYSTEMS"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TASK_STOPPED = 3  # compel's COMPEL_TASK_STOPPED, the task_state of a core image
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2


def links_reach(directory: str | os.PathLike[str], link_dev: int | None) -> bool:
    """Files in ``directory`` can be hard-linked to a local agent whose images are on the device
    ``link_dev`` (its ``hello``; ``None``: it offers no links)."""
    try:
        return link_dev is not None and os.stat(directory).st_dev == link_dev
    except OSError:
        return False


@dataclass(frozen=True)
class ImageFile:
    name: str
    path: Path
    size: int

    @property
    def is_pages(self) -> bool:
        return self.name.startswith("pages-")


def list_images(directory: str | os.PathLike[str]) -> list[ImageFile]:
    """The regular ``*.img`` files CRIU wrote in ``directory`` (symlinks such as ``parent`` and
    service files such as ``stats-dump`` are not images to send)."""
    out = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not IMAGE_NAME.fullmatch(entry.name):
            continue
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            out.append(ImageFile(entry.name, Path(entry.path), st.st_size))
    return out


#: Where the lazy flows keep the few non-lazy pages CRIU still writes as images, when it is a
#: memory filesystem with at least this much room.
_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 256 << 20


def memory_dir() -> Path | None:
    """``/dev/shm`` if it is a memory filesystem with room to spare, else ``None``.

    The lazy flows keep their images there (only the non-lazy pages: stack, vDSO, file-backed
    private pages), so that no page of the process touches a disk on either side."""
    try:
        st = os.statvfs(_SHM)
    except OSError:
        return None
    if filesystem_of(_SHM) not in MEMORY_FILESYSTEMS or st.f_bavail * st.f_frsize < _SHM_MIN_FREE:
        return None
    return _SHM if os.access(_SHM, os.W_OK | os.X_OK) else None


@dataclass(frozen=True)
class DirUsage:
    """Bytes in a directory tree: page images, other images, everything else (logs, stats).

    ``page_images`` counts the bytes really written (a sparse page image counts only its data);
    ``page_images_apparent`` the files' sizes."""

    page_images: int = 0
    other_images: int = 0
    other: int = 0
    page_images_apparent: int = 0
    filesystem: str = ""

    @property
    def in_memory(self) -> bool:
        """The files live in RAM (tmpfs): nothing of them was written to a disk."""
        return self.filesystem in MEMORY_FILESYSTEMS

    @property
    def total(self) -> int:
        return self.page_images + self.other_images + self.other

    def to_dict(self) -> dict[str, int]:
        return {"page_images": self.page_images, "other_images": self.other_images, "other": self.other,
                "total": self.total, "page_images_apparent": self.page_images_apparent}

    def __add__(self, other: DirUsage) -> DirUsage:
        """Both sets of figures (the filesystem of the first that names one)."""
        return DirUsage(self.page_images + other.page_images, self.other_images + other.other_images,
                        self.other + other.other, self.page_images_apparent + other.page_images_apparent,
                        self.filesystem or other.filesystem)

    def split(self) -> tuple[dict[str, int], dict[str, int]]:
        """(written to disk, held in memory): the figures go to one side, zeros to the other."""
        zero = {"page_images": 0, "other_images": 0, "other": 0}
        figures = {"page_images": self.page_images, "other_images": self.other_images, "other": self.other}
        return (zero, figures) if self.in_memory else (figures, zero)


def dir_usage(directory: str | os.PathLike[str] | None, *,
              skip: Container[tuple[int, int]] = ()) -> DirUsage:
    """Sum the sizes of the regular files under ``directory`` (symlinks not followed), but for
    the files in ``skip`` (``(st_dev, st_ino)``: files another directory wrote, hard-linked here).

    A sparse page image (page-server-on-source sends only the non-lazy pages) counts with the
    blocks it really uses."""
    pages = images = other = apparent = 0
    if directory is None or not os.path.isdir(directory):
        return DirUsage()
    for root, _dirs, files in os.walk(directory, followlinks=False):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in skip:
                continue
            if name.startswith("pages-") and name.endswith(".img"):
                pages += min(st.st_size, st.st_blocks * 512)
                apparent += st.st_size
            elif IMAGE_NAME.fullmatch(name):
                images += st.st_size
            else:
                other += st.st_size
    return DirUsage(pages, images, other, apparent, filesystem_of(directory))


# --- pagemap metadata ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)


@dataclass(frozen=True)
class Pagemap:
    """One ``pagemap-N.img``: the ``pages-<pages_id>.img`` it indexes and its entries."""

    name: str
    pages_id: int
    entries: tuple[PagemapEntry, ...]

    @property
    def pages_name(self) -> str:
        return f"pages-{self.pages_id}.img"

    def count(self, *, lazy: bool | None = None, present: bool | None = None) -> int:
        return sum(e.nr_pages for e in self.entries
                   if (lazy is None or e.lazy == lazy) and (present is None or e.present == present))


def _messages(path: str | os.PathLike[str], kind: str) -> list[Any]:
    """The entries of one CRIU image of type ``kind`` (``"PSTREE"``), as typed messages
    (:mod:`pycriu.images`, loaded on first use: the agent starts without protobuf). A damaged
    image is an :class:`~pycriu.images.ImageError` (a ``ValueError``) that names the file."""
    from ..images import ImageError, read_messages

    try:
        return list(read_messages(path, kind))
    except ImageError as e:
        if os.fspath(path) in str(e):
            raise
        raise ImageError(f"{os.fspath(path)}: {e}") from e  # a truncated message names only its type


def stopped_tasks(directory: str | os.PathLike[str]) -> dict[int, int]:
    """The processes the dump found stopped (``SIGSTOP``, job control), by their pid in the
    tree's own PID namespace, as ``pstree.img`` names them, each with the signal that stopped
    it (0 when the image does not say). A restore with ``leave_stopped`` leaves every task
    stopped by SIGSTOP; these stay stopped when the others resume, by their own signal."""
    d = Path(directory)
    stopped = {}
    for entry in _messages(d / "pstree.img", "PSTREE"):
        core = _messages(d / f"core-{entry.pid}.img", "CORE")
        tc = core[0].tc if core and core[0].HasField("tc") else None
        if tc is not None and tc.task_state == _TASK_STOPPED:
            stopped[entry.pid] = tc.stop_signo if tc.HasField("stop_signo") else 0
    return stopped


def read_pagemap(path: str | os.PathLike[str]) -> Pagemap:
    """A CRIU ``pagemap-*.img``: its PagemapHead (which ``pages-N.img`` it indexes) and entries."""
    messages = _messages(path, "PAGEMAP")
    if not messages:
        raise ValueError(f"{path}: no pagemap head")
    head, *rest = messages
    entries = []
    for e in rest:
        nr = e.nr_pages if e.HasField("nr_pages") else e.compat_nr_pages
        flags = e.flags if e.HasField("flags") else (PE_PARENT if e.in_parent else PE_PRESENT)
        entries.append(PagemapEntry(e.vaddr, nr, flags))
    return Pagemap(Path(path).name, head.pages_id, tuple(entries))


def pagemaps(directory: str | os.PathLike[str]) -> list[Pagemap]:
    """Every task pagemap in an images directory (``pagemap-shmem-*`` excluded)."""
    out = []
    for img in list_images(directory):
        if img.name.startswith("pagemap-") and not img.name.startswith("pagemap-shmem-"):
            out.append(read_pagemap(img.path))
    return out


def non_lazy_ranges(pagemap: Pagemap) -> list[tuple[int, int]]:
    """Byte ranges of ``pages-<id>.img`` that a lazy restore reads locally: the present pages of
    entries that are not lazy (stack, vDSO, file-backed or locked mappings). The lazy ones are
    skipped by the restore (CRIU only advances its offset) and fetched by the lazy-pages daemon."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    for e in pagemap.entries:
        if not e.present:
            continue
        length = e.nr_pages * PAGE_SIZE
        if not e.lazy:
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((offset, length))
        offset += length
    return ranges
