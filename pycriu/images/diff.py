"""What changed between two checkpoints of one process tree, page by page, by content.

Two dumps of a running tree (``criu dump --leave-running`` twice, or the rounds of a pre-copy)
show how fast the workload rewrites its memory, without the kernel's dirty tracking: a page
counts as changed when its bytes differ (:func:`pycriu.images._scan.changed_pages`, memcmp over
the mapped page files). The rate is what :func:`pycriu.migration.modes.advise` turns into a
choice of migration flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _scan
from .memory import PAGE_SIZE, AddressSpace, Mapping, Memory

__all__ = ["MappingDiff", "CheckpointDiff", "diff"]


@dataclass
class MappingDiff:
    """One mapping of one process: of the pages both checkpoints hold, how many differ; how
    many only the second holds (new: mapped or first written since) or only the first (gone)."""

    pid: int
    mapping: Mapping
    compared: int = 0
    changed: int = 0
    new: int = 0
    gone: int = 0

    def to_dict(self) -> dict[str, Any]:
        m = self.mapping
        return {"pid": self.pid, "start": m.start, "end": m.end, "kind": m.kind, "name": m.name,
                "compared": self.compared, "changed": self.changed, "new": self.new, "gone": self.gone}


@dataclass
class CheckpointDiff:
    """Checkpoint ``a`` against the later ``b``, per process and mapping (pages)."""

    a: str
    b: str
    #: seconds between the two dumps (their last files' times), 0 when not later
    interval: float
    mappings: list[MappingDiff] = field(default_factory=list)
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)

    def total(self, what: str) -> int:
        return sum(getattr(m, what) for m in self.mappings)

    @property
    def rewritten_bytes(self) -> int:
        """Bytes the workload wrote between the dumps: changed pages and new ones."""
        return (self.total("changed") + self.total("new")) * PAGE_SIZE

    @property
    def dirty_rate(self) -> float | None:
        """Bytes rewritten per second, or ``None`` when the interval is unknown."""
        return self.rewritten_bytes / self.interval if self.interval > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "interval": self.interval, "page_size": PAGE_SIZE,
                "compared": self.total("compared"), "changed": self.total("changed"), "new": self.total("new"),
                "gone": self.total("gone"), "rewritten_bytes": self.rewritten_bytes, "dirty_rate": self.dirty_rate,
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "mappings": [m.to_dict() for m in self.mappings]}


def _compare(pid: int, sa: AddressSpace, sb: AddressSpace) -> list[MappingDiff]:
    ra, rb = sa.runs(), sb.runs()
    rows: dict[tuple[int, int, str], MappingDiff] = {}

    def row(mapping: Mapping) -> MappingDiff:
        key = (mapping.start, mapping.end, mapping.name)
        found = rows.get(key)
        if found is None:
            found = rows[key] = MappingDiff(pid, mapping)
        return found

    overlap_a = [0] * len(ra)
    overlap_b = [0] * len(rb)
    i = j = 0
    while i < len(ra) and j < len(rb):
        a_start, a_len, a_buf, a_off, _ = ra[i]
        b_start, b_len, b_buf, b_off, b_map = rb[j]
        start = max(a_start, b_start)
        end = min(a_start + a_len, b_start + b_len)
        if start < end:
            pages = (end - start) // PAGE_SIZE
            pa, pb = a_off + start - a_start, b_off + start - b_start
            # a page the second dump took from the first one's files ("in parent") is the same bytes
            same = a_buf is b_buf and pa == pb
            changed = 0 if same else _scan.changed_pages(a_buf, pa, b_buf, pb, pages, PAGE_SIZE)
            r = row(sb.mappings[b_map])
            r.compared += pages
            r.changed += changed
            overlap_a[i] += pages
            overlap_b[j] += pages
        if a_start + a_len <= b_start + b_len:
            i += 1
        else:
            j += 1
    for k, (_s, length, _b, _o, m) in enumerate(rb):
        if length // PAGE_SIZE > overlap_b[k]:
            row(sb.mappings[m]).new += length // PAGE_SIZE - overlap_b[k]
    for k, (_s, length, _b, _o, m) in enumerate(ra):
        if length // PAGE_SIZE > overlap_a[k]:
            row(sa.mappings[m]).gone += length // PAGE_SIZE - overlap_a[k]
    return sorted(rows.values(), key=lambda r: r.mapping.start)


def diff(a: Memory, b: Memory) -> CheckpointDiff:
    """Compare checkpoint ``a`` with the later checkpoint ``b`` of the same tree (processes
    matched by their pid in ``pstree.img``)."""
    pids_a, pids_b = a.pids(), b.pids()
    interval = b.checkpoint.taken_at - a.checkpoint.taken_at
    out = CheckpointDiff(str(a.checkpoint.path), str(b.checkpoint.path), max(interval, 0.0),
                         only_in_a=[p for p in pids_a if p not in pids_b],
                         only_in_b=[p for p in pids_b if p not in pids_a])
    for pid in pids_b:
        if pid in pids_a:
            out.mappings.extend(_compare(pid, a.space(pid), b.space(pid)))
    return out
