"""A process's memory, read straight from a checkpoint's page images.

CRIU writes a task's memory as two files: ``pagemap-PID.img`` says which virtual pages were
dumped and how (present here, in the parent checkpoint, or left for lazy restore), and
``pages-ID.img`` holds the present pages' bytes, one after the other in pagemap order. Shared
memory (anonymous shared, System V, memfd) has its own ``pagemap-shmem-SHMID.img``, addressed by
offset in the object. :class:`Memory` maps the page files (``mmap``, never read into Python
objects) and resolves addresses through the chain of parent checkpoints of an incremental dump;
:class:`AddressSpace` is one process's view: its mappings (``mm-PID.img``), a read at an
address, and the runs of bytes a search or a comparison scans (:mod:`pycriu.images._scan`).
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from . import _scan
from .checkpoint import Checkpoint, Entry
from .errors import ImageError
from .stream import read_messages

__all__ = ["Memory", "AddressSpace", "Mapping", "Hit", "MemoryNotInImages", "PAGE_SIZE",
           "PE_PARENT", "PE_LAZY", "PE_PRESENT"]

#: The page size of the images (CRIU's images are in the dumping machine's pages: 4 KiB on x86).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# VMA status bits (CRIU's criu/include/image.h)
_STACK, _VSYSCALL, _VDSO, _HEAP = 1 << 1, 1 << 2, 1 << 3, 1 << 5
_FILE_PRIVATE, _FILE_SHARED, _ANON_SHARED, _ANON_PRIVATE = 1 << 6, 1 << 7, 1 << 8, 1 << 9
_SYSVIPC, _SOCKET, _VVAR, _AIORING, _MEMFD = 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14
_MAP_GROWSDOWN = 0x0100

# How a stretch of addresses is held: bytes in a page file, or why not.
DATA, ABSENT, LAZY, NO_PARENT = "data", "absent", "lazy", "no parent"


class MemoryNotInImages(ImageError):
    """The bytes asked for are not in the checkpoint: not mapped, left for a lazy restore, or
    backed by a file the images do not copy. ``address`` is the first such byte."""

    def __init__(self, message: str, address: int) -> None:
        super().__init__(message)
        self.address = address


@dataclass(frozen=True)
class Mapping:
    """One memory mapping of a process, as the dump saw it (``/proc/PID/maps``), with how many
    of its pages the checkpoint holds."""

    start: int
    end: int
    prot: str
    #: ``anon``, ``heap``, ``stack``, ``file``, ``file (shared)``, ``shmem``, ``sysv shm``,
    #: ``memfd``, ``vdso``, ``vvar``, ``vsyscall``, ``socket``, ``aio``
    kind: str
    #: the file or object mapped (a path, ``memfd:NAME``), or ``""``
    name: str
    pgoff: int
    #: pages whose bytes are in this checkpoint's page images / in a parent checkpoint's
    pages_images: int = 0
    pages_parent: int = 0
    #: pages a lazy restore fetches from the source (not in any image)
    pages_lazy: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "size": self.size, "prot": self.prot, "kind": self.kind,
                "name": self.name, "pgoff": self.pgoff, "pages_images": self.pages_images,
                "pages_parent": self.pages_parent, "pages_lazy": self.pages_lazy}


@dataclass(frozen=True)
class Hit:
    """One occurrence found by a search: the process, the address, and the mapping it lies in."""

    pid: int
    address: int
    mapping: Mapping

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "address": self.address, "mapping": {
            "start": self.mapping.start, "end": self.mapping.end, "kind": self.mapping.kind,
            "name": self.mapping.name}}


class _Pagemap:
    """One ``pagemap-*.img``, as sorted arrays: where each entry starts and ends, its flags,
    and where its bytes start in ``pages-<pages_id>.img`` (-1 when not there)."""

    def __init__(self, messages: list[Entry], where: str) -> None:
        if not messages:
            raise ImageError(f"{where}: no pagemap head")
        head, *entries = messages
        self.pages_id: int = head.pages_id
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.flags: list[int] = []
        self.offsets: list[int] = []
        offset = 0
        last_end = 0
        for e in entries:
            nr = e.nr_pages if e.HasField("nr_pages") else e.compat_nr_pages
            flags = e.flags if e.HasField("flags") else (PE_PARENT if e.in_parent else PE_PRESENT)
            if e.vaddr < last_end or e.vaddr % PAGE_SIZE:
                raise ImageError(f"{where}: entry at {e.vaddr:#x} is out of order or not page aligned "
                                 "(a corrupt pagemap)")
            last_end = e.vaddr + nr * PAGE_SIZE
            self.starts.append(e.vaddr)
            self.ends.append(last_end)
            self.flags.append(flags)
            if flags & PE_PRESENT:
                self.offsets.append(offset)
                offset += nr * PAGE_SIZE
            else:
                self.offsets.append(-1)
        #: bytes the present entries take in the page file
        self.data_size = offset


#: one resolved stretch: (start, length, how, buffer, offset in the buffer, depth: 0 for this
#: checkpoint's own page files, 1 for its parent's, ...)
Piece = tuple[int, int, str, Any, int, int]


class Memory:
    """The page images of a checkpoint and of its parents, mapped read-only, and the pagemaps
    that index them. A context manager: the maps are closed on exit (:meth:`close`)."""

    def __init__(self, checkpoint: Checkpoint | str | os.PathLike[str]) -> None:
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self._pagemaps: dict[tuple[str, str], _Pagemap | None] = {}
        self._maps: dict[tuple[str, int], tuple[mmap.mmap | None, memoryview]] = {}
        self._spaces: dict[int, AddressSpace] = {}
        #: this checkpoint and its parents (a loop of parent links is refused here)
        self._chain = self.checkpoint.chain()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap every page file (views handed out must not be used afterwards)."""
        maps, self._maps = self._maps, {}
        for m, view in maps.values():
            view.release()
            if m is not None:
                m.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self.checkpoint.pstree]

    def space(self, pid: int) -> AddressSpace:
        """The memory of process ``pid`` (its pid in ``pstree.img``)."""
        space = self._spaces.get(pid)
        if space is None:
            if pid not in self.pids():
                raise ImageError(f"{self.checkpoint.path}: no process {pid} in the checkpoint "
                                 f"(it holds {', '.join(map(str, self.pids()))})")
            space = self._spaces[pid] = AddressSpace(self, pid)
        return space

    def spaces(self) -> Iterator[AddressSpace]:
        for pid in self.pids():
            yield self.space(pid)

    # -- page files ---------------------------------------------------------------------------

    def _pagemap(self, ckpt: Checkpoint, name: str) -> _Pagemap | None:
        key = (str(ckpt.path), name)
        if key not in self._pagemaps:
            # read straight into the arrays: the checkpoint's own cache would keep every entry's
            # message too (a pagemap can hold hundreds of thousands)
            path = ckpt.path / name
            self._pagemaps[key] = _Pagemap(list(read_messages(path, "PAGEMAP")), str(path)) if ckpt.has(name) else None
        return self._pagemaps[key]

    def _pages(self, ckpt: Checkpoint, pm: _Pagemap) -> memoryview:
        key = (str(ckpt.path), pm.pages_id)
        found = self._maps.get(key)
        if found is None:
            path = ckpt.path / f"pages-{pm.pages_id}.img"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ImageError(f"{path}: missing, though its pagemap lists {pm.data_size} bytes") from None
            try:
                size = os.fstat(fd).st_size
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
            finally:
                os.close(fd)
            if size < pm.data_size:
                if m is not None:
                    m.close()
                raise ImageError(f"{path}: {size} bytes, but its pagemap lists {pm.data_size} (truncated)")
            if m is not None:
                m.madvise(mmap.MADV_SEQUENTIAL)
            found = self._maps[key] = (m, memoryview(m if m is not None else b""))
        return found[1]

    def resolve(self, name: str, start: int, length: int, ckpt: Checkpoint | None = None,
                depth: int = 0) -> list[Piece]:
        """How the bytes ``[start, start + length)`` of pagemap ``name`` are held, following
        pages marked "in parent" into the parent checkpoints."""
        ckpt = ckpt or self.checkpoint
        pm = self._pagemap(ckpt, name)
        end = start + length
        if pm is None:
            return [(start, length, ABSENT, None, 0, depth)]
        pieces: list[Piece] = []
        i = max(bisect.bisect_right(pm.starts, start) - 1, 0)
        if i < len(pm.ends) and pm.ends[i] <= start:
            i += 1
        pos = start
        while pos < end:
            if i >= len(pm.starts) or pm.starts[i] >= end:
                pieces.append((pos, end - pos, ABSENT, None, 0, depth))
                break
            if pm.starts[i] > pos:
                pieces.append((pos, pm.starts[i] - pos, ABSENT, None, 0, depth))
                pos = pm.starts[i]
            stop = min(end, pm.ends[i])
            flags = pm.flags[i]
            if flags & PE_PRESENT:
                pieces.append((pos, stop - pos, DATA, self._pages(ckpt, pm), pm.offsets[i] + pos - pm.starts[i], depth))
            elif flags & PE_PARENT:
                parent = self._chain[depth + 1] if depth + 1 < len(self._chain) else None
                if parent is None:
                    pieces.append((pos, stop - pos, NO_PARENT, None, 0, depth))
                else:
                    pieces.extend(self.resolve(name, pos, stop - pos, parent, depth + 1))
            elif flags & PE_LAZY:
                pieces.append((pos, stop - pos, LAZY, None, 0, depth))
            else:
                pieces.append((pos, stop - pos, ABSENT, None, 0, depth))
            pos = stop
            i += 1
        return pieces

    @cached_property
    def memfd_inodes(self) -> dict[int, Entry]:
        """The memfd inodes (``memfd.img``) by inode id: their names and the shmid of their pages."""
        return {e.inode_id: e for e in self.checkpoint.optional("memfd.img", "MEMFD_INODE")}

    def held_bytes(self) -> int:
        """Bytes of memory the checkpoint holds for its processes: pages in its own page files
        and in its parents' (shared memory counts once per process that maps it)."""
        return sum(m.pages_images + m.pages_parent for s in self.spaces() for m in s.mappings) * PAGE_SIZE

    def shared_pagemap(self, vma: Entry) -> str | None:
        """The pagemap of the shared object a mapping maps, when it has one."""
        if vma.status & _MEMFD:
            f = self.checkpoint.files.get(vma.shmid)
            inode = self.memfd_inodes.get(f.memfd.inode_id) if f is not None and f.HasField("memfd") else None
            return None if inode is None else f"pagemap-shmem-{inode.shmid}.img"
        if vma.status & (_ANON_SHARED | _SYSVIPC):
            return f"pagemap-shmem-{vma.shmid}.img"
        return None


def _prot(prot: int) -> str:
    return ("r" if prot & 1 else "-") + ("w" if prot & 2 else "-") + ("x" if prot & 4 else "-")


class AddressSpace:
    """The memory of one process of a checkpoint: its mappings, reads at an address, search."""

    def __init__(self, memory: Memory, pid: int) -> None:
        self.memory = memory
        self.pid = pid
        ckpt = memory.checkpoint
        self._mm = ckpt.mm(pid)
        self._private = f"pagemap-{pid}.img"
        # each mapping: its pagemap name and the shift from an address to that pagemap's space
        self._vmas: list[tuple[Entry, str, int]] = []
        for vma in self._mm.vmas:
            shared = memory.shared_pagemap(vma)
            if shared is not None:
                self._vmas.append((vma, shared, vma.pgoff - vma.start))
            else:
                self._vmas.append((vma, self._private, 0))
        self._starts = [v.start for v, _, _ in self._vmas]

    @cached_property
    def mappings(self) -> list[Mapping]:
        """Every mapping, lowest address first, with its page counts."""
        out = []
        for vma, pagemap, shift in self._vmas:
            own = parent = lazy = 0
            for _start, length, how, _buf, _off, depth in self._resolve(pagemap, shift, vma.start,
                                                                        vma.end - vma.start):
                if how == DATA and depth == 0:
                    own += length // PAGE_SIZE
                elif how == DATA:
                    parent += length // PAGE_SIZE
                elif how == LAZY:
                    lazy += length // PAGE_SIZE
            out.append(Mapping(vma.start, vma.end, _prot(vma.prot), self._kind(vma), self._name(vma), vma.pgoff,
                               own, parent, lazy))
        return out

    def _resolve(self, pagemap: str, shift: int, start: int, length: int) -> list[Piece]:
        """:meth:`Memory.resolve` in this process's addresses (a shared object's pagemap is
        addressed by offset in the object)."""
        pieces = self.memory.resolve(pagemap, start + shift, length)
        if not shift:
            return pieces
        return [(s - shift, n, how, buf, off, depth) for s, n, how, buf, off, depth in pieces]

    def _kind(self, vma: Entry) -> str:
        st = vma.status
        for bit, kind in ((_VSYSCALL, "vsyscall"), (_VDSO, "vdso"), (_VVAR, "vvar"), (_SOCKET, "socket"),
                          (_AIORING, "aio"), (_MEMFD, "memfd"), (_SYSVIPC, "sysv shm"), (_ANON_SHARED, "shmem"),
                          (_FILE_SHARED, "file (shared)"), (_FILE_PRIVATE, "file"), (_HEAP, "heap"),
                          (_STACK, "stack")):
            if st & bit:
                return kind
        return "stack" if vma.flags & _MAP_GROWSDOWN else "anon"

    def _name(self, vma: Entry) -> str:
        if not vma.status & (_FILE_PRIVATE | _FILE_SHARED | _MEMFD):
            return ""
        f = self.memory.checkpoint.files.get(vma.shmid)
        if f is None:
            return f"file {vma.shmid}"
        if f.HasField("reg"):
            return f.reg.name
        if f.HasField("memfd"):
            inode = self.memory.memfd_inodes.get(f.memfd.inode_id)
            if inode is not None:
                return f"memfd:{inode.name}"
        return f"file {vma.shmid}"

    def mapping_at(self, address: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self._vmas[i][0].end > address:
            return self.mappings[i]
        return None

    # -- reading --------------------------------------------------------------------------

    def pieces(self, start: int, length: int) -> Iterator[tuple[int, Piece]]:
        """``(mapping index, piece)`` for the bytes ``[start, start + length)``; addresses that
        no mapping covers come as ``(-1, (start, length, "unmapped", None, 0, 0))``."""
        end = start + length
        pos = start
        i = max(bisect.bisect_right(self._starts, pos) - 1, 0)
        while pos < end:
            if i >= len(self._vmas) or self._vmas[i][0].start >= end:
                yield -1, (pos, end - pos, "unmapped", None, 0, 0)
                return
            vma, pagemap, shift = self._vmas[i]
            if vma.end <= pos:
                i += 1
                continue
            if vma.start > pos:
                yield -1, (pos, vma.start - pos, "unmapped", None, 0, 0)
                pos = vma.start
            stop = min(end, vma.end)
            for piece in self._resolve(pagemap, shift, pos, stop - pos):
                yield i, piece
            pos = stop
            i += 1

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address``, as the process saw them at the dump. Anonymous memory
        the dump did not list was never written and reads as zeros; anything else missing (not
        mapped, lazy, a file's clean pages) is a :class:`MemoryNotInImages`."""
        if size < 0 or address < 0:
            raise ValueError("address and size must not be negative")
        out = bytearray()
        for i, (start, length, how, buf, off, _depth) in self.pieces(address, size):
            if how == DATA:
                out += buf[off:off + length]
                continue
            vma = self._vmas[i][0] if i >= 0 else None
            if how == ABSENT and vma is not None and vma.status & (_ANON_PRIVATE | _ANON_SHARED | _SYSVIPC) \
                    and not vma.status & (_VDSO | _VVAR | _VSYSCALL):
                out += bytes(length)
                continue
            raise MemoryNotInImages(self._why(start, how, i), start)
        return bytes(out)

    def _why(self, address: int, how: str, i: int) -> str:
        where = f"process {self.pid}, {address:#x}"
        if i < 0:
            return f"{where}: not mapped (see the process's mappings)"
        if how == LAZY:
            return f"{where}: left for a lazy restore (a lazy dump keeps these pages at the source)"
        if how == NO_PARENT:
            return f"{where}: in the parent checkpoint, but this one has no parent link"
        mapping = self.mappings[i]
        if mapping.name:
            return f"{where}: a clean page of {mapping.name}, which the images do not copy (read the file)"
        return f"{where}: not in the images ({mapping.kind} memory the dump did not save)"

    # -- scanning -------------------------------------------------------------------------

    def runs(self) -> list[tuple[int, int, memoryview, int, int]]:
        """The bytes this checkpoint holds for the process: ``(address, length, buffer,
        offset, mapping index)``, lowest address first, a run per stretch that is contiguous
        both in memory and in one page file."""
        runs: list[tuple[int, int, memoryview, int, int]] = []
        for i, (vma, pagemap, shift) in enumerate(self._vmas):
            for start, length, how, buf, off, _depth in self._resolve(pagemap, shift, vma.start,
                                                                      vma.end - vma.start):
                if how != DATA:
                    continue
                if runs:
                    ps, pl, pb, po, pi = runs[-1]
                    if pi == i and pb is buf and ps + pl == start and po + pl == off:
                        runs[-1] = (ps, pl + length, pb, po, pi)
                        continue
                runs.append((start, length, buf, off, i))
        return runs

    def find(self, needle: bytes, limit: int = 1000) -> tuple[int, list[Hit]]:
        """Every occurrence of ``needle`` in the process's memory: ``(count, the first
        ``limit`` hits)``. Occurrences that straddle two runs held in different files are found
        too."""
        if not needle:
            raise ValueError("the search string is empty")
        count = 0
        hits: list[Hit] = []
        runs = self.runs()
        for k, (start, length, buf, off, i) in enumerate(runs):
            offsets: list[int] = []
            n = _scan.find_all(buf, off, off + length, needle, offsets, max(limit - len(hits), 0))
            count += n
            hits.extend(Hit(self.pid, start + o, self.mappings[i]) for o in offsets)
            # an occurrence that starts in this run's last bytes and ends in the next one's
            if k + 1 < len(runs) and len(needle) > 1 and runs[k + 1][0] == start + length:
                nstart, nlength, nbuf, noff, ni = runs[k + 1]
                tail = min(len(needle) - 1, length)
                joined = bytes(buf[off + length - tail:off + length]) + bytes(nbuf[noff:noff + min(len(needle) - 1,
                                                                                                  nlength)])
                across: list[int] = []
                m = _scan.find_all(joined, 0, len(joined), needle, across, limit)
                for o in across:
                    if o < tail:  # starts in this run: not already counted in either
                        count += 1
                        if len(hits) < limit:
                            hits.append(Hit(self.pid, start + length - tail + o, self.mappings[i]))
                del m
        return count, hits

    def find_regex(self, pattern: re.Pattern[bytes], limit: int = 1000, overlap: int = PAGE_SIZE
                   ) -> tuple[int, list[Hit]]:
        """Every match of ``pattern`` (a compiled bytes regular expression) in the process's
        memory, as :meth:`find`. A match that straddles two runs held in different files is
        found when it is at most ``overlap`` bytes long on either side of the seam."""
        count = 0
        hits: list[Hit] = []
        runs = self.runs()
        for k, (start, length, buf, off, i) in enumerate(runs):
            view = buf[off:off + length]
            try:
                for m in pattern.finditer(view):
                    count += 1
                    if len(hits) < limit:
                        hits.append(Hit(self.pid, start + m.start(), self.mappings[i]))
            finally:
                view.release()
            if k + 1 < len(runs) and runs[k + 1][0] == start + length:
                nstart, nlength, nbuf, noff, ni = runs[k + 1]
                tail = min(overlap, length)
                joined = bytes(buf[off + length - tail:off + length]) + bytes(nbuf[noff:noff + min(overlap, nlength)])
                for m in pattern.finditer(joined):
                    if m.start() < tail < m.end():  # crosses the seam: neither run saw it whole
                        count += 1
                        if len(hits) < limit:
                            hits.append(Hit(self.pid, start + length - tail + m.start(), self.mappings[i]))
        return count, hits
