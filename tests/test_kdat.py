"""CRIU's kernel-probe cache (:mod:`pycriu.kdat`): where ``/run`` is not a tmpfs CRIU keeps none,
and every CRIU process probes the kernel first (20-30 ms, inside a migration's downtime for the
restore and the lazy-pages daemon). pycriu gives it back, with the lifetime CRIU intends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu import kdat
from pycriu._fs import filesystem_of
from pycriu.workload import Workload

pytestmark = [
    needs_root,
    pytest.mark.criu,
    pytest.mark.skipif(filesystem_of("/run") == "tmpfs", reason="/run is a tmpfs: CRIU keeps its own cache"),
]


def _drop() -> None:
    while subprocess.run(["umount", str(kdat.CACHE)], capture_output=True).returncode == 0:
        pass


@pytest.fixture
def cold() -> Iterator[None]:
    """No cache to begin with; the cache is set up again afterwards (as any migration would)."""
    _drop()
    yield
    kdat.ensure(pycriu.Criu().binary)


def _dump_log(criu: pycriu.Criu, w: Workload, images: Path) -> str:
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images, leave_running=True, log_level=pycriu.LogLevel.INFO))
    return (images / "dump.log").read_text()


def test_criu_loads_the_cache_pycriu_keeps(criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path,
                                           cold: None) -> None:
    w = workload(mib=8)
    assert kdat.status(criu.binary) == "cold"
    (tmp_path / "a").mkdir()
    assert "Loaded kdat cache" not in _dump_log(criu, w, tmp_path / "a")  # CRIU probed the kernel

    assert kdat.ensure(criu.binary) == "warm"
    (tmp_path / "b").mkdir()
    assert f"Loaded kdat cache from {kdat.CACHE}" in _dump_log(criu, w, tmp_path / "b")
    assert kdat.ensure(criu.binary) == "warm"  # idempotent: nothing to do the second time
    w.wait_beats(2)


def test_a_cache_made_for_another_binary_or_boot_is_made_again(criu: pycriu.Criu, cold: None) -> None:
    assert kdat.ensure(criu.binary) == "warm"
    stamp = Path("/dev/shm/pycriu/criu.kdat.json")
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "boot": "another boot"}))
    assert kdat.status(criu.binary) == "cold"
    assert kdat.ensure(criu.binary) == "warm"
    assert json.loads(stamp.read_text())["boot"] != "another boot"
    # one bind mount, not a stack of them
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4] == str(kdat.CACHE)]
    assert len(mounts) == 1


def test_an_empty_mount_point_left_by_a_reboot_is_discarded_by_criu(criu: pycriu.Criu, cold: None) -> None:
    """After a reboot the bind mount is gone and its empty mount point remains: CRIU takes it for a
    stale cache, removes it and probes afresh (what it does with its own cache)."""
    kdat.CACHE.touch()
    assert criu.check()
    assert not kdat.CACHE.exists() or kdat.CACHE.stat().st_size == 0


@pytest.mark.parametrize("planted", ["symlink", "foreign directory", "open directory"])
def test_a_directory_planted_in_dev_shm_is_not_trusted(criu: pycriu.Criu, cold: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, planted: str) -> None:
    """/dev/shm is world-writable: a user may create pycriu's directory name first (after a
    reboot, say). pycriu then leaves CRIU without its cache rather than write as root through a
    directory, or a link, that someone else controls."""
    keep = Path(f"/dev/shm/pycriu-test-{os.getpid()}")
    victim = tmp_path / "victim"
    victim.mkdir()
    if planted == "symlink":
        keep.symlink_to(victim)
    else:
        keep.mkdir(mode=0o700)
        if planted == "foreign directory":
            os.chown(keep, 65534, 65534)
        else:
            keep.chmod(0o777)
    monkeypatch.setattr(kdat, "_KEEP", keep)
    try:
        assert kdat.ensure(criu.binary) == "cold"
        assert not list(victim.iterdir()), "written through the planted link"
        if not keep.is_symlink():
            assert not list(keep.iterdir()), "written into the planted directory"
        assert not any(line.split()[4] == str(kdat.CACHE)
                       for line in Path("/proc/self/mountinfo").read_text().splitlines())
    finally:
        if keep.is_symlink():
            keep.unlink()
        else:
            shutil.rmtree(keep)


def test_an_operator_sees_turns_off_and_removes_it(criu: pycriu.Criu, cold: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``pycriu doctor`` says it is there and how to undo it; ``PYCRIU_KDAT=off`` keeps a
    migration's checks from setting it up; ``pycriu doctor --undo-kdat`` removes it all."""
    assert kdat.ensure(criu.binary) == "warm"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    shown = subprocess.run([sys.executable, "-m", "pycriu", "doctor", "--json"], capture_output=True, text=True,
                           env=env, timeout=120).stdout
    assert "--undo-kdat" in shown and "PYCRIU_KDAT=off" in shown
    undo = subprocess.run([sys.executable, "-m", "pycriu", "doctor", "--undo-kdat"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert undo.returncode == 0 and f"unmounted pycriu's cache from {kdat.CACHE}" in undo.stdout, undo
    assert "removed /dev/shm/pycriu/criu.kdat\n" in undo.stdout
    assert kdat.status(criu.binary) == "cold" and not kdat.CACHE.exists()
    # (/dev/shm is the machine's: another pycriu run may keep a copy there again at any time;
    # the mount is this mount namespace's)
    again = subprocess.run([sys.executable, "-m", "pycriu", "doctor", "--undo-kdat"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert again.returncode == 0 and "unmounted" not in again.stdout
    monkeypatch.setenv("PYCRIU_KDAT", "off")
    assert kdat.ensure(criu.binary) == "cold"
    assert not kdat.CACHE.exists()
    monkeypatch.delenv("PYCRIU_KDAT")
    assert kdat.ensure(criu.binary) == "warm"  # and back, as the next migration would
