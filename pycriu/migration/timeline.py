"""A migration's timeline as an SVG picture: one lane per host, each phase a bar at the moment it
ran (both hosts on the source's clock, see :class:`~pycriu.migration.report.Phase`), and the
downtime (from the freeze on the source to the resume on the destination) as a band across both,
so that one sees at a glance where the downtime goes. No dependency: plain SVG text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Protocol

__all__ = ["render_svg", "Timed"]


class _Phase(Protocol):
    name: str
    seconds: float
    detail: str
    start: float | None
    host: str


class Timed(Protocol):
    """What a timeline is drawn from (a :class:`~pycriu.migration.report.MigrationReport`)."""

    pid: int
    mode: str
    destination: str
    outcome: str
    downtime: float | None
    total_seconds: float
    marks: dict[str, float]

    @property
    def phases(self) -> Sequence[_Phase]: ...

_WIDTH = 960
_LEFT = 110  # room for the lane names
_LANE = 34
_BAR = 22
_TOP = 46
_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")


def _ticks(span: float) -> list[float]:
    """Round tick positions (seconds) for an axis of ``span`` seconds: about eight of them."""
    raw = span / 8 if span > 0 else 0.001
    step = 10.0 ** math.floor(math.log10(raw))  # the power of ten at or below raw
    for m in (1, 2, 5, 10):
        if step * m >= raw:
            step *= m
            break
    return [i * step for i in range(int(span / step) + 1)]


def render_svg(report: Timed) -> str:
    """The timeline of ``report`` (phases without a start, from older reports, are left out)."""
    phases = [p for p in report.phases if p.start is not None]
    hosts = ["source", "destination"] + sorted({p.host for p in phases} - {"source", "destination"})
    span = max([report.total_seconds] + [p.start + p.seconds for p in phases if p.start is not None]) or 0.001
    scale = (_WIDTH - _LEFT - 20) / span
    height = _TOP + _LANE * len(hosts) + 64

    def x(t: float) -> float:
        return _LEFT + max(0.0, t) * scale

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
           f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(f'pycriu migration of pid {report.pid}: {report.mode}, {report.outcome}')}</title>",
           f'<text x="{_LEFT}" y="18" font-size="13" font-weight="bold">'
           f"{escape(f'{report.mode} to {report.destination}: {report.outcome}')}"
           + (escape(f", downtime {report.downtime * 1000:.1f} ms") if report.downtime is not None else "")
           + escape(f", total {report.total_seconds * 1000:.0f} ms") + "</text>"]
    freeze, resume = report.marks.get("freeze"), report.marks.get("resume")
    if freeze is not None and resume is not None:
        band = max(1.0, (resume - freeze) * scale)
        out.append(f'<rect class="downtime" x="{x(freeze):.2f}" y="{_TOP - 8}" width="{band:.2f}" '
                   f'height="{_LANE * len(hosts) + 8}" fill="#e15759" fill-opacity="0.15" stroke="#e15759"/>')
        out.append(f'<text x="{x(freeze) + 2:.2f}" y="{_TOP - 12}" fill="#e15759">downtime '
                   f"{(resume - freeze) * 1000:.1f} ms</text>")
    colors: dict[str, str] = {}
    for lane, host in enumerate(hosts):
        y = _TOP + lane * _LANE
        out.append(f'<text x="8" y="{y + _BAR - 7}" font-weight="bold">{escape(host)}</text>')
        out.append(f'<line x1="{_LEFT}" y1="{y + _BAR + 4}" x2="{_WIDTH - 20}" y2="{y + _BAR + 4}" stroke="#ddd"/>')
        for p in (p for p in phases if p.host == host):
            assert p.start is not None
            color = colors.setdefault(p.name, _COLORS[len(colors) % len(_COLORS)])
            w = max(1.0, p.seconds * scale)
            label = f"{p.name} {p.seconds * 1000:.1f} ms" + (f" ({p.detail})" if p.detail else "")
            out.append(f'<rect class="phase" data-host="{escape(host)}" data-name="{escape(p.name)}" '
                       f'x="{x(p.start):.2f}" y="{y}" width="{w:.2f}" height="{_BAR}" fill="{color}">'
                       f"<title>{escape(label)}</title></rect>")
            if w > 6 * len(p.name):
                out.append(f'<text x="{x(p.start) + 3:.2f}" y="{y + _BAR - 7}" fill="white">{escape(p.name)}</text>')
    axis = _TOP + _LANE * len(hosts) + 10
    out.append(f'<line x1="{_LEFT}" y1="{axis}" x2="{_WIDTH - 20}" y2="{axis}" stroke="black"/>')
    for t in _ticks(span):
        out.append(f'<line x1="{x(t):.2f}" y1="{axis}" x2="{x(t):.2f}" y2="{axis + 4}" stroke="black"/>'
                   f'<text x="{x(t):.2f}" y="{axis + 16}" text-anchor="middle">{t * 1000:.0f} ms</text>')
    legend_y = axis + 36
    lx = _LEFT
    for name, color in colors.items():
        out.append(f'<rect x="{lx}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{legend_y}">{escape(name)}</text>')
        lx += 24 + 6 * len(name)
    out.append("</svg>")
    return "\n".join(out) + "\n"
