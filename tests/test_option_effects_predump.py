"""Options of pre-dumps and of the dumps built on them, shown by the effect: the way CRIU read
the memory, recorded in the pre-dump's inventory, and the parent's copies of pages that a dump
writes again, punched out of the parent with auto_dedup. These need the kernel's dirty-memory
tracking (soft-dirty): where it is missing they skip, and ``make test-vm
VM_TESTS=tests/test_option_effects_predump.py`` runs them on Debian 12's own kernel.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_mem_track, needs_root

import pycriu
import pycriu.images
from pycriu.workload import Workload

pytestmark = [needs_root, needs_mem_track, pytest.mark.criu]

WorkloadFactory = Callable[..., Workload]
PRE_DUMP_SPLICE, PRE_DUMP_READ = 1, 2  # the values CRIU writes in the inventory (criu/include/cr_options.h)


def _images(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def _recorded_mode(images: Path) -> int:
    return int(pycriu.images.loads((images / "inventory.img").read_bytes())["entries"][0]["pre_dump_mode"])


def test_pre_dump_mode_is_how_the_pre_dump_read_the_memory_as_its_inventory_records(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    w = workload(mib=8, touch=0.2)
    for name, mode, recorded in (("default", None, PRE_DUMP_SPLICE),
                                 ("splice", pycriu.PreDumpMode.SPLICE, PRE_DUMP_SPLICE),
                                 ("read", pycriu.PreDumpMode.READ, PRE_DUMP_READ)):
        result = criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, name), track_mem=True,
                                                     pre_dump_mode=mode))
        assert result.stats is not None and result.stats.pages_written >= 8 * 256, name
        assert _recorded_mode(tmp_path / name) == recorded, name
    assert w.alive()


def _blocks(images: Path) -> int:
    """Disk blocks the page images of ``images`` take (punched holes take none)."""
    return sum(p.stat().st_blocks for p in images.glob("pages-*.img"))


def test_auto_dedup_punches_the_parent_s_copies_of_the_pages_a_dump_writes_again(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    """The workload rewrites a fifth of its memory each beat. A pre-dump on top of another
    leaves the first one's pages on disk; a dump with auto_dedup on top of the second punches
    out of it the pages it writes again."""
    w = workload(mib=16, touch=0.2)
    criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, "pre-1"), track_mem=True))
    w.wait_beats(5)
    first = _blocks(tmp_path / "pre-1")
    criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, "pre-2"), track_mem=True,
                                        parent_images="../pre-1"))
    assert _blocks(tmp_path / "pre-1") == first, "without auto_dedup the parent keeps its pages"
    w.wait_beats(5)
    second = _blocks(tmp_path / "pre-2")
    final = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "dump"), track_mem=True,
                                         parent_images="../pre-2", auto_dedup=True))
    assert final.stats is not None and final.stats.pages_written > 0
    assert _blocks(tmp_path / "pre-2") < second, "auto_dedup did not punch the parent's rewritten pages"
    restored = criu.restore(pycriu.RestoreOptions(images_dir=tmp_path / "dump"))
    w.adopt(restored.pid)
    w.wait_beats(3)
    got, want = w.check_memory()
    assert got == want, "the restored memory is not what the workload had written"
