"""Pre-dump and the dumps built on it: :meth:`Criu.pre_dump`, a dump with ``track_mem`` on top of
parent images, and :meth:`Criu.dump_iterations`: what iterative (pre-copy) migration is made of.

Real CRIU on the sample workload, which here keeps writing (``touch``): each restored tree must
hold, bit for bit, the memory the workload had written up to the beat it answers in
(:meth:`Workload.check_memory`), so a page written after a pre-dump and missing from the final
dump shows. These need the kernel's dirty-memory tracking (soft-dirty): where it is missing they
skip, and ``make test-vm`` runs them on Debian 12's own kernel, which has it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_mem_track, needs_root

import pycriu
from pycriu.workload import Workload

pytestmark = [needs_root, needs_mem_track]

WorkloadFactory = Callable[..., Workload]
MIB = 16
PAGES = MIB * 256


def restore_and_check(criu: pycriu.Criu, w: Workload, images: Path) -> pycriu.RestoreResult:
    """Restore ``images``, adopt the tree; its heartbeat goes on and its memory is complete."""
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images))
    w.adopt(restored.pid)
    w.wait_beats(5)
    got, want = w.check_memory()
    assert got == want, "the restored memory is not what the workload had written"
    return restored


def test_pre_dump_copies_the_memory_and_the_tree_runs_on(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    w = workload(mib=MIB, touch=0.2)
    images = tmp_path / "pre-1"
    images.mkdir()
    result = criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=images, track_mem=True))
    assert result.log_path == images / "pre-dump.log" and result.log_path.exists()
    assert result.stats is not None and result.stats.pages_written >= PAGES
    assert list(images.glob("pages-*.img")) and (images / "inventory.img").exists()
    assert w.alive()
    w.wait_beats(5)
    got, want = w.check_memory()
    assert got == want  # pre-dump only reads


def test_a_dump_on_top_of_a_pre_dump_writes_what_changed_and_restores_everything(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    w = workload(mib=MIB, touch=0.2)
    (tmp_path / "pre-1").mkdir()
    (tmp_path / "dump").mkdir()
    pre = criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=tmp_path / "pre-1", track_mem=True))
    w.wait_beats(20)  # pages written now are only in the final dump
    final = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=tmp_path / "dump", track_mem=True,
                                         parent_images="../pre-1"))
    assert pre.stats is not None and final.stats is not None
    assert final.stats.pages_skipped_parent >= PAGES // 2, final.stats
    assert 0 < final.stats.pages_written < pre.stats.pages_written // 2, final.stats
    assert (tmp_path / "dump" / "parent").is_symlink()
    assert not w.alive()
    restore_and_check(criu, w, tmp_path / "dump")


def test_a_chain_of_pre_dumps_then_the_dump(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    w = workload(mib=MIB, touch=0.2)
    parent: str | None = None
    written = []
    for name in ("pre-1", "pre-2", "pre-3"):
        (tmp_path / name).mkdir()
        r = criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=tmp_path / name, track_mem=True,
                                                parent_images=f"../{parent}" if parent else None))
        assert r.stats is not None
        written.append(r.stats.pages_written)
        parent = name
        w.wait_beats(5)
    assert written[1] < written[0] // 2 and written[2] < written[0] // 2, written
    (tmp_path / "dump").mkdir()
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=tmp_path / "dump", track_mem=True,
                                 parent_images=f"../{parent}"))
    restore_and_check(criu, w, tmp_path / "dump")


def test_pre_dump_failure_is_a_pre_dump_error(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=1)
    with pytest.raises(pycriu.PreDumpError) as info:
        criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=images_dir, parent_images="../missing"))
    assert isinstance(info.value, pycriu.DumpError)
    assert info.value.operation == "pre-dump"
    assert info.value.criu_message is not None
    assert "Invalid parent image directory provided" in info.value.criu_message
    assert w.alive()
    w.wait_beats(3)


def test_dump_iterations_pre_dumps_each_round_into_its_own_directory(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=MIB, touch=0.2)
    rounds: list[int] = []

    def more() -> bool:
        rounds.append(w.wait_beats(5)["beat"])  # the tree runs between the rounds
        return len(rounds) < 2

    result = criu.dump_iterations(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir), more)
    assert len(rounds) == 2
    assert sorted(p.name for p in images_dir.glob("pre-*")) == ["pre-1", "pre-2"]
    assert list((images_dir / "pre-1").glob("pages-*.img"))
    assert (images_dir / "pre-2" / "parent").readlink() == Path("../pre-1")
    assert (images_dir / "parent").readlink() == Path("pre-2")
    # the final dump wrote what changed since the second round, not the whole memory again
    assert result.stats is not None and result.stats.pages_skipped_parent >= PAGES // 2, result.stats
    restore_and_check(criu, w, images_dir)


def test_an_exception_in_more_stops_before_the_dump_and_the_tree_runs_on(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=1)

    def more() -> bool:
        raise RuntimeError("the caller gave up")

    with pytest.raises(RuntimeError, match="the caller gave up"):
        criu.dump_iterations(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir), more)
    assert w.alive()
    w.wait_beats(3)
    assert list((images_dir / "pre-1").glob("pages-*.img"))  # the pre-dump ran
    assert not (images_dir / "inventory.img").exists()  # the dump did not


@pytest.mark.parametrize(("option", "message"), [({"track_mem": False}, "track_mem"),
                                                 ({"parent_images": "../x"}, "parent_images")])
def test_dump_iterations_refuses_options_that_contradict_it(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path, option: dict[str, object],
        message: str) -> None:
    w = workload(mib=1)
    with pytest.raises(pycriu.InvalidOptionError, match=message):
        criu.dump_iterations(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, **option), lambda: False)
    assert w.alive()
