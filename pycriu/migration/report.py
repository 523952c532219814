"""``MigrationReport``: what a migration did, how long the process was down, what moved where.

Every figure is measured, not assumed: phase durations are clock readings around each step, disk
figures are sums of the file sizes found in the directories of both sides just before they were
removed, control and image bytes are counted on the wire, and the page-server figures come from
CRIU's own statistics or its pagemaps (pages x page size).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MigrationReport", "Phase"]


@dataclass
class Phase:
    """One step of a migration: its duration in seconds, when it began (seconds after the
    migration began, on the source's clock: a destination's phase is placed there from the
    agent's own timing and half the round trip) and on which host it ran."""

    name: str
    seconds: float
    detail: str = ""
    start: float | None = None
    host: str = "source"


@dataclass
class MigrationReport:
    """The result of :meth:`pycriu.Migration.run` (also attached to a :class:`MigrationError`).

    Attributes:
        mode: the flow that ran (``classic``, ``page-server``, ``lazy``, ``page-server-on-source``,
            ``pre-copy``, ``hybrid``).
        requested_mode: what was asked for (``auto`` resolves to ``mode``).
        mode_reason: why this flow (for ``auto``: what both hosts support).
        outcome: ``migrated`` (destination runs, source gone), ``rolled-back`` (the destination
            never took over; the source runs again with its memory intact), ``refused`` (stopped
            before anything was frozen), ``failed-after-resume`` (a lazy flow broke after the
            destination resumed; see ``source_state``), or ``unknown``.
        rollback_plan: what a failure after the freeze would bring the source back from: ``the
            stopped source`` (resumed) or, on one host, ``the source's images`` (the dump ended
            it; :mod:`pycriu.migration.rollback`). Empty when the run ended before choosing.
        rollback: how the source came back after a failure (resumed, or restored from its own
            images on one host), empty when it did not
        source_pid: the source tree's root pid at the end: ``pid``, or the new pid of a source
            restored from its images
        source_state / destination_state: where the process is now, measured at the end
            (``running``, ``stopped``, ``gone``, ``killed``, ``none``, ``unknown``).
        downtime: seconds from the freeze on the source to the resume on the destination, or
            ``None`` when the destination never resumed. ``downtime_method`` says how it was
            measured across two clocks.
        phases: the steps in order with their durations.
        bytes: bytes per channel (``control`` and ``images`` counted on the wire;
            ``page_server`` = pages through CRIU's page server or lazy-pages connection x page
            size).
        pages: page counts (``total``, ``in_image_files``, ``via_page_server``, ``lazy``).
        disk: bytes written to disk on ``source`` and ``destination`` (``page_images``,
            ``other_images``, ``other`` = logs and statistics).
        memory: the same figures for images kept in a memory filesystem (tmpfs) instead, which
            never reach a disk (the lazy flows' few non-lazy pages).
        criu_stats: CRIU's ``dump``, ``restore`` and ``pre_dumps`` statistics.
        logs: CRIU and agent log paths on this host (destination logs are fetched back).
    """

    mode: str
    requested_mode: str
    destination: str
    transport: str
    pid: int
    mode_reason: str = ""
    outcome: str = "unknown"
    source_state: str = "unknown"
    destination_state: str = "none"
    destination_pid: int | None = None
    rollback_plan: str = ""
    rollback: str = ""
    source_pid: int | None = None
    error: str | None = None
    downtime: float | None = None
    downtime_method: str = ""
    total_seconds: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    disk: dict[str, dict[str, int]] = field(default_factory=dict)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    criu_stats: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    pre_copy: list[dict[str, Any]] = field(default_factory=list)
    pre_copy_stop: str | None = None
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: moments (seconds after the start, source clock): ``freeze`` and ``resume`` bound the downtime
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "migrated"

    def phase(self, name: str) -> float | None:
        """Total seconds spent in phases called ``name`` (``None`` if there was none)."""
        times = [p.seconds for p in self.phases if p.name == name]
        return sum(times) if times else None

    # -- serialisation ---------------------------------------------------------------------------

    def timeline_svg(self) -> str:
        """This migration as a picture: phases of both hosts on one clock, the downtime marked
        (:mod:`pycriu.migration.timeline`)."""
        from .timeline import render_svg

        return render_svg(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationReport:
        data = dict(data)
        data["phases"] = [Phase(**p) for p in data.get("phases", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MigrationReport:
        return cls.from_dict(json.loads(text))

    # -- display ---------------------------------------------------------------------------------

    def __str__(self) -> str:
        lines = [f"Migration of pid {self.pid} to {self.destination} ({self.transport}), mode {self.mode}"
                 + (f" (asked: {self.requested_mode})" if self.requested_mode != self.mode else "")]
        if self.mode_reason:
            lines.append(f"  why this mode:   {self.mode_reason}")
        lines.append(f"  outcome:         {self.outcome}")
        if self.error:
            lines.append(f"  error:           {self.error}")
        lines.append(f"  source:          {self.source_state}")
        if self.rollback_plan and not self.rollback:
            lines.append(f"  rollback plan:   {self.rollback_plan}")
        if self.rollback:
            lines.append(f"  rollback:        {self.rollback}")
        dest = self.destination_state + (f", pid {self.destination_pid}" if self.destination_pid else "")
        lines.append(f"  destination:     {dest}")
        if self.downtime is not None:
            lines.append(f"  downtime:        {self.downtime * 1000:.0f} ms  (freeze on the source to resume on the "
                         "destination)")
        lines.append(f"  total time:      {self.total_seconds:.2f} s")
        if self.phases:
            lines.append("  phases:")
            for p in self.phases:
                extra = f"  {p.detail}" if p.detail else ""
                name = p.name if p.host == "source" else f"{p.name} ({p.host})"
                lines.append(f"    {name:<24} {p.seconds * 1000:9.1f} ms{extra}")
        if self.pre_copy:
            lines.append(f"  pre-copy:        {len(self.pre_copy)} iteration(s); stop: {self.pre_copy_stop}")
        if self.bytes:
            lines.append("  bytes by channel:")
            for k, v in self.bytes.items():
                lines.append(f"    {k:<24} {_size(v):>12}")
        if self.pages:
            lines.append("  pages:           " + ", ".join(f"{k} {v}" for k, v in self.pages.items()))
        for where, figures in (("disk", self.disk), ("tmpfs", self.memory)):
            for side in ("source", "destination"):
                d = figures.get(side)
                if d and (where == "disk" or any(d.values())):
                    lines.append(f"  {where}, {side}:".ljust(23) + f"page images {_size(d.get('page_images', 0))}, "
                                 f"other images {_size(d.get('other_images', 0))}, "
                                 f"logs/stats {_size(d.get('other', 0))}")
        if self.logs:
            lines.append("  logs:")
            for label, path in self.logs.items():
                lines.append(f"    {label:<24} {path}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
