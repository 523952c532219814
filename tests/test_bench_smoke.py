"""The benchmark harness works: one ``python -m bench --quick`` run (smallest size, loopback,
one repeat) of the documented criu CLI flows, and of pycriu's flows when ``pycriu.migration``
exists. Benchmark numbers are never pass/fail here; only that the harness measured something
real and wrote every output."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FEATURES, needs_root

pytestmark = [needs_root, pytest.mark.slow, pytest.mark.criu]

REPO = Path(__file__).resolve().parent.parent
MODES = ["classic", "page-server", "lazy", "page-server-on-source"]
HAS_MIGRATION = importlib.util.find_spec("pycriu.migration") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    impls = ["pycriu", "baseline"] if HAS_MIGRATION else ["baseline"]
    cmd = [sys.executable, "-m", "bench", "--quick", "--modes", ",".join(MODES), "--impls", ",".join(impls),
           "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    doc = json.loads((out / "latest.json").read_text())
    doc["_out"] = out
    doc["_impls"] = impls
    return doc


def test_outputs_written(quick_run: dict) -> None:
    out: Path = quick_run["_out"]
    for name in ("latest.json", "latest.md", "latest.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("2*.json"))) == 1  # the timestamped copy
    assert "| link | MiB | rate | mode |" in (out / "latest.md").read_text()
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_link_reference_measured(quick_run: dict) -> None:
    assert set(quick_run["links"]) == {"lo"}
    lo = quick_run["links"]["lo"]
    assert lo["throughput_bytes_per_s"] > 0
    assert lo["throughput_start"]["bytes"] > 0 and lo["throughput_start"]["seconds"] > 0


def test_every_trial_measured(quick_run: dict) -> None:
    lazy_ok = FEATURES is not None and FEATURES.lazy_pages
    expected = {(impl, mode) for impl in quick_run["_impls"] for mode in MODES
                if lazy_ok or mode in ("classic", "page-server")}
    trials = quick_run["trials"]
    assert {(t["impl"], t["mode"]) for t in trials} == expected
    for t in trials:
        name = f"{t['impl']} {t['mode']}"
        assert t["ok"], f"{name}: {t['error']}"
        assert t["link"] == "lo" and t["repeat"] == 0
        for field in ("downtime_s", "total_s", "resumed_s", "full_speed_s", "nominal_interval_ms"):
            assert t[field] > 0, f"{name}: {field}={t[field]}"
        assert t["downtime_s"] <= t["total_s"] + 0.01, name
        assert 0.5 < t["nominal_interval_ms"] < 5, name  # the 1 kHz heartbeat ran
        assert t["missing_beats"] == 0, name
        assert t["verify_bad_pages"] == 0, name
        assert t["net_bytes"] >= 0 and t["disk_src_bytes"] >= 0 and t["disk_dst_bytes"] >= 0, name
        mib = t["mib"] << 20
        if t["mode"] in ("page-server", "lazy", "page-server-on-source"):
            assert t["net_bytes"] > mib * 0.9, f"{name}: the pages crossed the link ({t['net_bytes']} bytes)"
        if t["mode"] == "classic":
            assert t["disk_src_pages_bytes"] > mib * 0.9, name
        if t["mode"] == "page-server":
            assert t["disk_src_pages_bytes"] == 0, name  # no page image on the source
            assert t["disk_dst_pages_bytes"] > mib * 0.9, name
        if t["mode"] == "lazy":
            assert t["disk_src_pages_bytes"] < mib * 0.1 and t["disk_dst_pages_bytes"] < mib * 0.1, name
            assert t["lazy_done_s"] > 0, name
        if t["impl"] == "baseline":
            assert t["criu_own_s"] > 0, name


def test_summary_and_targets(quick_run: dict) -> None:
    rows = quick_run["summary"]
    assert rows and all(r["link"] == "lo" for r in rows)
    for r in rows:
        assert r["baseline"]["n"] == 1 and r["baseline"]["downtime_s"] > 0
        if HAS_MIGRATION:
            assert r["ratio"]["downtime_s"] > 0 and r["ratio"]["total_s"] > 0
    if HAS_MIGRATION:
        assert any(t["target"] == "downtime pycriu/CLI" for t in quick_run["targets"])
    assert quick_run["environment"]["criu_version"]
    skipped = {s["mode"] for s in quick_run["skipped"]}
    lazy_ok = FEATURES is not None and FEATURES.lazy_pages
    # --modes named only the four flows that need no memory tracking
    assert skipped == (set() if lazy_ok else {"lazy", "page-server-on-source"})
