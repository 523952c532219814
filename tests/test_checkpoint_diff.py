"""pycriu diff: pages changed between two checkpoints of one tree, by content, and the flow
advice that follows from the rate.

The tree of tests/memory_support.py is dumped, rewrites exactly REWRITE pages of its region, and
is dumped again; the difference must be exactly those pages. The advice is pure logic: tested
without root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from memory_support import PAGES, REWRITE, KnownTree, known_tree

from pycriu import Migration
from pycriu.images.diff import diff
from pycriu.images.memory import Memory
from pycriu.migration.modes import advise
from pycriu.workload import Workload


@pytest.fixture(scope="module")
def two_dumps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KnownTree, Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("not root: checkpoint/restore needs CAP_SYS_ADMIN")
    work = tmp_path_factory.mktemp("diff")
    with known_tree(work) as kt:
        a = kt.dump(work / "a")
        kt.rewrite()
        b = kt.dump(work / "b")
        yield kt, a, b


@needs_root
@pytest.mark.criu
def test_the_rewritten_pages_and_only_they_changed_in_the_region(two_dumps: tuple[KnownTree, Path, Path]) -> None:
    kt, a, b = two_dumps
    with Memory(a) as ma, Memory(b) as mb:
        d = diff(ma, mb)
    region = [m for m in d.mappings if m.pid == 1 and m.mapping.contains(kt.base)]
    assert len(region) == 1
    r = region[0]
    assert r.compared >= PAGES  # the kernel may have merged the region with a neighbour
    assert (r.changed, r.new, r.gone) == (REWRITE, 0, 0)
    # the child did not rewrite its copy
    child = [m for m in d.mappings if m.pid == 3 and m.mapping.contains(kt.base)]
    assert [(m.changed, m.new, m.gone) for m in child] == [(0, 0, 0)]
    assert d.interval > 0 and d.dirty_rate is not None
    assert d.rewritten_bytes >= REWRITE * os.sysconf("SC_PAGE_SIZE")


@needs_root
@pytest.mark.criu
def test_a_checkpoint_against_itself_has_no_change(two_dumps: tuple[KnownTree, Path, Path]) -> None:
    _kt, a, _b = two_dumps
    with Memory(a) as m1, Memory(a) as m2:
        d = diff(m1, m2)
    assert (d.total("changed"), d.total("new"), d.total("gone")) == (0, 0, 0)
    assert d.total("compared") > PAGES


@needs_root
@pytest.mark.criu
def test_the_command_reports_the_change_and_a_flow(two_dumps: tuple[KnownTree, Path, Path]) -> None:
    kt, a, b = two_dumps
    out = subprocess.run([sys.executable, "-m", "pycriu", "diff", str(a), str(b), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    [region] = [m for m in data["mappings"] if m["pid"] == 1 and m["start"] <= kt.base < m["end"]]
    assert region["changed"] == REWRITE
    assert data["advice"]["modes"][0] in ("page-server", "lazy")
    text = subprocess.run([sys.executable, "-m", "pycriu", "diff", str(a), str(b)], capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 0 and "migration:" in text.stdout


def test_a_directory_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pycriu", "diff", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no inventory.img" in out.stderr and "Traceback" not in out.stderr


# -- the advice ----------------------------------------------------------------------------------

MiB = 1 << 20
GBIT = 125e6


def test_a_small_quiet_workload_is_moved_whole_in_the_freeze() -> None:
    a = advise(dirty_rate=0.1 * MiB, memory=32 * MiB, bandwidth=GBIT)
    assert a.modes[0] == "page-server" and a.precopy_converges
    assert a.stop_and_copy_downtime == pytest.approx(32 * MiB / GBIT)


def test_a_big_workload_that_pre_copy_can_follow_gets_lazy_then_pre_copy() -> None:
    a = advise(dirty_rate=10 * MiB, memory=8 << 30, bandwidth=GBIT)
    assert a.modes[:3] == ("lazy", "hybrid", "pre-copy") and a.precopy_converges
    assert "converges" in a.reason


def test_a_workload_that_writes_faster_than_the_link_is_never_advised_pre_copy() -> None:
    a = advise(dirty_rate=100 * MiB, memory=4 << 30, bandwidth=GBIT)
    assert a.modes[0] == "lazy" and not a.precopy_converges
    assert "pre-copy" not in a.modes and "hybrid" not in a.modes


def test_nonsense_figures_are_refused() -> None:
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        advise(1.0, 1, bandwidth=0)
    with pytest.raises(ValueError):
        advise(-1.0, 1)


# -- before a migration --------------------------------------------------------------------------


@needs_root
@pytest.mark.criu
def test_a_migration_can_sample_how_fast_the_tree_writes_and_leaves_it_running(
        workload: Callable[..., Workload]) -> None:
    """The workload rewrites half of its 16 MiB every second: the sample sees megabytes."""
    w = workload(mib=16, touch=0.5)
    sample = Migration(w.pid, to="local").sample_dirty_rate(1.0)
    assert sample.diff.rewritten_bytes > 1 << 20
    assert sample.memory >= 16 << 20
    assert sample.advice.modes and "MiB/s" in sample.advice.reason
    assert w.alive(w.pid)
    w.wait_beats(3)  # still running: the dumps left it so


@needs_root
@pytest.mark.criu
def test_the_dry_run_prints_the_sample(workload: Callable[..., Workload]) -> None:
    w = workload(mib=8, touch=0.5)
    out = subprocess.run([sys.executable, "-m", "pycriu", "migrate", str(w.pid), "--dry-run", "--sample-dirty",
                          "0.5", "--json", "-q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["outcome"] == "checked"
    assert data["dirty_sample"]["rewritten_bytes"] > 0 and data["dirty_sample"]["modes"]
    alone = subprocess.run([sys.executable, "-m", "pycriu", "migrate", str(w.pid), "--sample-dirty", "1"],
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2 and "goes with --dry-run" in alone.stderr
    assert w.alive(w.pid)
