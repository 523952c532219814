"""Cgroup options CRIU acts on, shown by the effect: which cgroup the restored tree lands in and
which properties it gets back, what the images hold of the tree's cgroups, how the tree is
frozen. The tree lives in a cgroup of this test's own in the cgroup v1 ``pids`` hierarchy (and
the v1 freezer); the cgroup is removed at the end, whatever happened.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from test_option_effects import Program

import pycriu
import pycriu.images
from pycriu.migration.procs import kill_tree, tree_state, wait_gone

PIDS = Path("/sys/fs/cgroup/pids")
FREEZER = Path("/sys/fs/cgroup/freezer")

pytestmark = [needs_root, pytest.mark.criu,
              pytest.mark.skipif(not (PIDS / "pids.max").exists() and not (PIDS / "cgroup.procs").exists(),
                                 reason=f"no cgroup v1 pids hierarchy at {PIDS}")]

#: a cgroup-props document that dumps no property of the pids controller
NO_PIDS_PROPS = '"pids":\n - "strategy": "replace"\n - "properties": []\n'


def _remove(cgroup: Path) -> None:
    deadline = time.monotonic() + 10
    while cgroup.exists():
        for pid in (cgroup / "cgroup.procs").read_text().split():
            kill_tree(int(pid))
            wait_gone(int(pid))
        try:
            cgroup.rmdir()
        except OSError:
            assert time.monotonic() < deadline, f"{cgroup} could not be removed"
            time.sleep(0.05)


@pytest.fixture
def cgroup() -> Iterator[Callable[[Path], Path]]:
    """Factory: ``cgroup(hierarchy)`` makes a cgroup of this test there (removed at the end, its
    processes killed)."""
    made: list[Path] = []

    def make(hierarchy: Path) -> Path:
        if not hierarchy.is_dir():
            pytest.skip(f"no cgroup v1 hierarchy at {hierarchy}")
        made.append(hierarchy / f"pycriu-test-{uuid.uuid4().hex[:8]}")
        made[-1].mkdir()
        return made[-1]

    yield make
    for c in made:
        _remove(c)


@pytest.fixture
def in_cgroup(tmp_path: Path, cgroup: Callable[[Path], Path]) -> Iterator[tuple[Program, Path]]:
    """A sleeping program moved into a pids cgroup of its own whose pids.max is 77."""
    pids = cgroup(PIDS)
    (pids / "pids.max").write_text("77")
    p = Program("import time, pathlib\n"
                f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\ntime.sleep(3600)\n", tmp_path / "ready")
    (pids / "cgroup.procs").write_text(str(p.pid))
    yield p, pids
    p.close()


def _pids_cgroup(pid: int) -> str:
    return next(line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if line.split(":")[1] == "pids")


def _images(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def test_manage_cgroups_and_cgroup_mode_decide_the_restored_tree_s_cgroup_and_its_properties(
        criu: pycriu.Criu, in_cgroup: tuple[Program, Path], tmp_path: Path) -> None:
    """Restored while the cgroup's pids.max is 55 (77 at the dump): left out of the cgroup when
    cgroups are not managed; put back in it otherwise, its properties restored only in FULL
    mode; refused in STRICT mode, since the cgroup exists."""
    p, pids = in_cgroup
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    ours, its = _pids_cgroup(os.getpid()), f"/{pids.name}"
    mode = pycriu.CgroupMode
    for given, where, limit in (({"manage_cgroups": False}, ours, "55"), ({"manage_cgroups": True}, its, "55"),
                                ({"cgroup_mode": mode.IGNORE}, ours, "55"), ({"cgroup_mode": mode.SOFT}, its, "55"),
                                ({"cgroup_mode": mode.FULL}, its, "77")):
        (pids / "pids.max").write_text("55")
        restored = criu.restore(pycriu.RestoreOptions(images_dir=images, **given))  # type: ignore[arg-type]
        p.pids.append(restored.pid)
        try:
            assert _pids_cgroup(restored.pid) == where, given
            assert (pids / "pids.max").read_text().strip() == limit, given
        finally:
            kill_tree(restored.pid)
            wait_gone(restored.pid)
    with pytest.raises(pycriu.RestoreError) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images, cgroup_mode=mode.STRICT))
    assert "Abort restore of existing cgroups" in (info.value.criu_message or "")


def _dumped(images: Path) -> dict[str, list[str]]:
    """Controllers of the tree's cgroups in the images -> the pids cgroup's dumped properties."""
    entry = pycriu.images.loads((images / "cgroup.img").read_bytes())["entries"][0]
    out: dict[str, list[str]] = {}
    for controller in entry["controllers"]:
        names = ",".join(controller.get("cnames", []))
        out[names] = [prop["name"] for d in controller.get("dirs", []) for prop in d.get("properties", [])]
    return out


def test_cgroup_props_props_file_and_dump_controllers_decide_what_the_images_hold(
        criu: pycriu.Criu, in_cgroup: tuple[Program, Path], tmp_path: Path) -> None:
    p, _ = in_cgroup
    props_file = tmp_path / "props.yaml"
    props_file.write_text(NO_PIDS_PROPS)

    def dump(name: str, **given: object) -> dict[str, list[str]]:
        images = _images(tmp_path, name)
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, leave_running=True, **given))  # type: ignore[arg-type]
        return _dumped(images)

    default = dump("default")
    assert "pids.max" in default["pids"] and len(default) > 1
    assert "pids.max" not in dump("props", cgroup_props=NO_PIDS_PROPS)["pids"]
    assert "pids.max" not in dump("props-file", cgroup_props_file=props_file)["pids"]
    assert list(dump("controllers", cgroup_dump_controllers=["pids"])) == ["pids"]


def test_cgroup_yard_is_where_criu_mounts_the_hierarchies_it_restores_into(
        criu: pycriu.Criu, in_cgroup: tuple[Program, Path], tmp_path: Path) -> None:
    """CRIU mounts the controllers it needs in the yard it is given, and leaves them there
    (without one it uses a temporary directory of its own and removes it)."""
    p, pids = in_cgroup
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, cgroup_dump_controllers=["pids"]))
    wait_gone(p.pid)
    yard = _images(tmp_path, "yard")
    unused = _images(tmp_path, "unused")
    try:
        restored = criu.restore(pycriu.RestoreOptions(images_dir=images, work_dir=unused))
        p.pids.append(restored.pid)
        kill_tree(restored.pid)
        wait_gone(restored.pid)
        assert not any(d.is_dir() and os.path.ismount(d) for d in unused.iterdir())
        restored = criu.restore(pycriu.RestoreOptions(images_dir=images, cgroup_yard=yard))
        p.pids.append(restored.pid)
        assert os.path.ismount(yard / "pids"), "CRIU did not mount the pids hierarchy in the yard"
        assert _pids_cgroup(restored.pid) == f"/{pids.name}"
    finally:
        for d in yard.iterdir():
            if os.path.ismount(d):
                subprocess.run(["umount", str(d)], check=True)


@pytest.fixture
def frozen_log(criu: pycriu.Criu, in_cgroup: tuple[Program, Path], cgroup: Callable[[Path], Path],
               tmp_path: Path) -> Callable[..., str]:
    """Dump the tree (it goes on running) with the given options at DEBUG; CRIU's log. The tree
    is in a freezer cgroup of its own too, ``freezer_of_the_tree`` names it."""
    p, _ = in_cgroup
    freezer = cgroup(FREEZER)
    (freezer / "cgroup.procs").write_text(str(p.pid))

    def log(name: str, **given: object) -> str:
        images = _images(tmp_path, name)
        if given.get("freeze_cgroup") == "freezer_of_the_tree":
            given["freeze_cgroup"] = str(freezer)
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, leave_running=True,
                                     log_level=pycriu.LogLevel.DEBUG, **given))  # type: ignore[arg-type]
        assert tree_state(p.pid) == "running"
        return (images / "dump.log").read_text().replace(str(freezer), "freezer_of_the_tree")

    return log


def test_freeze_cgroup_freezes_the_tree_through_its_freezer(frozen_log: Callable[..., str]) -> None:
    """CRIU's log: the tree is frozen through the freezer cgroup it is given, not one process
    after the other."""
    assert "freezing cgroup" not in frozen_log("ptrace")
    assert "freezing cgroup freezer_of_the_tree: 100 x 100ms attempts, timeout: 10s" in frozen_log(
        "freezer", freeze_cgroup="freezer_of_the_tree")


def test_timeout_bounds_the_attempts_to_freeze(frozen_log: Callable[..., str]) -> None:
    assert "freezing cgroup freezer_of_the_tree: 30 x 100ms attempts, timeout: 3s" in frozen_log(
        "timeout", freeze_cgroup="freezer_of_the_tree", timeout=3)


def _dirs(images: Path, controller: str) -> set[str]:
    """Every cgroup directory of ``controller`` the images hold, as paths below the tree's root."""
    entry = pycriu.images.loads((images / "cgroup.img").read_bytes())["entries"][0]
    found: set[str] = set()

    def walk(dirs: list[dict[str, object]], prefix: str) -> None:
        for d in dirs:
            name = f"{prefix}/{d['dir_name']}".replace("//", "/")
            found.add(name)
            walk(d.get("children", []), name)  # type: ignore[arg-type]

    for c in entry["controllers"]:
        if controller in c.get("cnames", []):
            walk(c.get("dirs", []), "")
    return found


def test_cgroup_roots_on_dump_take_the_empty_cgroups_below_the_root_too(
        criu: pycriu.Criu, cgroup: Callable[[Path], Path], tmp_path: Path) -> None:
    """The tree's task lives in ``ROOT/leaf``; ``ROOT/empty`` holds no task. CRIU dumps the
    cgroups that hold the tree's tasks; given ``ROOT`` as the dump's cgroup root (zdtm's
    cgroup02), it walks it and dumps the empty one too, so the restore recreates it."""
    root = cgroup(PIDS)
    (root / "leaf").mkdir()
    (root / "empty").mkdir()
    p = Program("import time, pathlib\n"
                f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\ntime.sleep(3600)\n", tmp_path / "ready")
    (root / "leaf" / "cgroup.procs").write_text(str(p.pid))
    try:
        rel = "/" + str(root.relative_to(PIDS))

        def dump(name: str, **given: object) -> set[str]:
            images = _images(tmp_path, name)
            criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, leave_running=True, manage_cgroups=True,
                                         **given))  # type: ignore[arg-type]
            return _dirs(images, "pids")

        without = dump("without")
        assert any(d.endswith("/leaf") for d in without) and not any(d.endswith("/empty") for d in without)
        with_root = dump("with", cgroup_roots=[pycriu.CgroupRoot(rel, "pids")])
        assert any(d.endswith("/empty") for d in with_root), with_root
    finally:
        p.close()
        for sub in ("leaf", "empty"):
            _remove(root / sub)
