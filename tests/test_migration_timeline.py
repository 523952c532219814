"""A migration's timeline: every phase of both hosts with its start on the source's clock, and an
SVG picture of it (``MigrationReport.timeline_svg()``, ``pycriu migrate --timeline FILE``) with the
downtime as a band from the freeze to the resume."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root

from pycriu.migration import Migration, MigrationReport
from pycriu.migration.report import Phase
from pycriu.workload import Workload

SVG = "{http://www.w3.org/2000/svg}"


def _rects(svg: str, cls: str) -> list[ET.Element]:
    return [r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("class") == cls]


def test_each_phase_is_a_bar_in_its_host_s_lane_and_the_downtime_a_band() -> None:
    report = MigrationReport(mode="classic", requested_mode="classic", destination="local", transport="local", pid=7,
                             outcome="migrated", downtime=0.030, total_seconds=0.200,
                             phases=[Phase("checks", 0.050, start=0.0), Phase("freeze+dump", 0.020, start=0.100),
                                     Phase("criu restore", 0.008, start=0.121, host="destination"),
                                     Phase("old report", 0.5)],  # no start: left out
                             marks={"freeze": 0.100, "resume": 0.130})
    svg = report.timeline_svg()
    bars = {(r.get("data-host"), r.get("data-name")): r for r in _rects(svg, "phase")}
    assert set(bars) == {("source", "checks"), ("source", "freeze+dump"), ("destination", "criu restore")}
    scale = float(bars["source", "checks"].get("width")) / 0.050  # pixels per second
    assert float(bars["source", "freeze+dump"].get("width")) == pytest.approx(0.020 * scale, rel=0.01)
    band = _rects(svg, "downtime")[0]
    assert float(band.get("width")) == pytest.approx(0.030 * scale, rel=0.01)
    assert float(band.get("x")) == pytest.approx(float(bars["source", "freeze+dump"].get("x")), abs=0.01)
    assert "downtime 30.0 ms" in svg
    assert float(bars["source", "checks"].get("y")) != float(bars["destination", "criu restore"].get("y"))


def test_names_are_escaped() -> None:
    report = MigrationReport(mode="classic", requested_mode="classic", destination="tcp://<x>&", transport="tcp",
                             pid=1, phases=[Phase("a<b>&c", 0.01, detail='"d"', start=0.0)])
    ET.fromstring(report.timeline_svg())  # well-formed XML


@needs_root
@pytest.mark.criu
@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages)])
def test_a_real_migration_places_the_destination_s_restore_inside_the_downtime(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    w = workload(mib=16)
    report = Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    w.adopt(report.destination_pid)  # type: ignore[arg-type]
    assert report.downtime is not None
    freeze, resume = report.marks["freeze"], report.marks["resume"]
    assert resume - freeze == pytest.approx(report.downtime, abs=1e-5)
    restore = next(p for p in report.phases if p.name == "criu restore")
    assert restore.host == "destination" and restore.start is not None
    # the destination's CRIU restore ran after the freeze and ended before its copy resumed
    # (within half a round trip on this host: the clocks are joined through the control channel)
    assert freeze - 0.002 <= restore.start and restore.start + restore.seconds <= resume + 0.002, (freeze, restore,
                                                                                                  resume)
    # inside it, where CRIU's time went: its notifications, in order, within the phase
    assert restore.detail.startswith("CRIU's notifications: "), restore.detail
    marks = []
    for item in restore.detail.removeprefix("CRIU's notifications: ").split(", "):
        action, at = item.split(" +")
        marks.append((action, float(at.removesuffix(" ms"))))
    assert [a for a, _ in marks][-2:] == ["pre-resume", "post-resume"] and "post-restore" in dict(marks), marks
    assert all(0 <= t <= restore.seconds * 1000 for _, t in marks) and [t for _, t in marks] == sorted(
        t for _, t in marks)
    starts = [p.start for p in report.phases if p.host == "source"]
    assert all(s is not None for s in starts) and starts == sorted(starts)  # type: ignore[type-var]
    bars = _rects(report.timeline_svg(), "phase")
    assert {r.get("data-host") for r in bars} == {"source", "destination"}


@needs_root
@pytest.mark.criu
def test_pycriu_migrate_writes_the_timeline(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8)
    out = private_tmp.parent / "t.svg"
    proc = subprocess.run([sys.executable, "-m", "pycriu", "migrate", str(w.pid), "--mode", "classic", "--quiet",
                           "--json", "--timeline", str(out), "--log-dir", str(private_tmp.parent / "logs")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    w.adopt(MigrationReport.from_json(proc.stdout).destination_pid)  # type: ignore[arg-type]
    assert _rects(out.read_text(), "downtime")
