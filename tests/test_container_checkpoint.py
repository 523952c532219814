"""Checkpoint and restore of a real runc container with pycriu, and interoperability with runc in
both directions: images pycriu writes restore with ``runc restore`` (runc then owns the
container), and images ``runc checkpoint`` writes restore with pycriu (the restored tree is then
the caller's). In each, the counter goes on and the memory checksum holds."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
from container_support import WORKLOAD, gone, needs_runc, sites  # noqa: F401 - fixture
from image_support import assert_round_trips

import pycriu
from pycriu.containers import DESCRIPTORS_FILE, RuncBundle, RuncContainer
from pycriu.inspect import inspect

pytestmark = [needs_runc, pytest.mark.containers]


def test_pycriu_checkpoint_restores_with_runc(sites, tmp_path) -> None:  # noqa: F811
    source, _ = sites
    ct = source.run(source.ids[0])
    pid = ct.pid

    result = ct.checkpoint(tmp_path / "images")

    assert result.stats is not None and result.stats.pages_written > 0
    assert json.loads((tmp_path / "images" / DESCRIPTORS_FILE).read_text()) == ["/dev/null"] * 3
    assert source.runc.containers() == []  # like runc checkpoint: the container is gone from runc
    assert gone(pid)
    last = source.counter()
    restored = RuncContainer.restore(ct.id, bundle=source.bundle, images_dir=tmp_path / "images",
                                     runc=source.runc)
    assert restored.status == "running"
    assert source.wait_counting(above=last) > last
    assert source.sums()[0] == source.sums()[1]


def test_pycriu_checkpoint_leave_running(sites, tmp_path) -> None:  # noqa: F811
    source, _ = sites
    ct = source.run(source.ids[0])
    ct.checkpoint(tmp_path / "images", leave_running=True)
    assert ct.status == "running"
    source.wait_counting(above=source.counter())


def test_a_container_checkpoint_round_trips_and_inspect_shows_its_mounts_and_cgroups(sites, tmp_path) -> None:  # noqa: F811
    """A container's images hold what a host tree's do not: its mount namespace (mountpoints),
    cgroups, network and UTS namespaces. Every one round-trips; inspect shows them."""
    source, _ = sites
    ct = source.run(source.ids[0])
    ct.checkpoint(tmp_path / "images", leave_running=True)
    kinds = assert_round_trips(tmp_path / "images")
    assert {"MNTS", "CGROUP", "NETNS", "UTSNS", "CORE", "PAGEMAP"} <= kinds, kinds
    seen = inspect(tmp_path / "images")
    mounts = {m.mountpoint: m for m in seen.mounts}
    assert "/" in mounts and mounts["/proc"].fstype == "proc"
    assert mounts["/data"].external  # the bind mount from the host is an external one
    root = next(p for p in seen.processes if p.ppid == 0)
    assert root.cmdline == ["sh", "-c", WORKLOAD]
    assert root.pid == 1 and root.cgroups  # the container's init, in its runc cgroup
    live = open(f"/proc/{ct.pid}/cgroup").read().split(":")[-1].strip()
    assert any(path.endswith(live.rsplit("/", 1)[-1]) for path in root.cgroups.values()), (root.cgroups, live)
    assert seen.hostnames  # its own UTS namespace


def test_runc_checkpoint_restores_with_pycriu(sites, tmp_path, criu) -> None:  # noqa: F811
    source, _ = sites
    ct = source.run(source.ids[0])
    images = tmp_path / "images"
    source.runc.run("checkpoint", "--image-path", str(images), "--work-path", str(tmp_path), ct.id)
    assert source.runc.containers() == []
    last = source.counter()
    stdio = tuple(json.loads((images / DESCRIPTORS_FILE).read_text()))
    options = dataclasses.replace(RuncBundle(str(source.bundle)).options(), stdio=stdio)

    with options.restore_options(images_dir=images, work_dir=tmp_path, log_file="pycriu-restore.log") as opts:
        result = criu.restore(opts)
    try:
        assert source.wait_counting(above=last) > last
        assert source.sums()[0] == source.sums()[1]
        assert os.readlink(f"/proc/{result.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        os.kill(result.pid, signal.SIGKILL)


def test_pycriu_checkpoint_restores_with_pycriu(sites, tmp_path, criu) -> None:  # noqa: F811
    source, _ = sites
    ct = source.run(source.ids[0])
    options = ct.options()
    ct.checkpoint(tmp_path / "images")
    last = source.counter()
    with options.restore_options(images_dir=tmp_path / "images", work_dir=tmp_path) as opts:
        result = criu.restore(opts)
    try:
        assert source.wait_counting(above=last) > last
        assert source.sums()[0] == source.sums()[1]
    finally:
        os.kill(result.pid, signal.SIGKILL)
    assert isinstance(result, pycriu.RestoreResult)


def test_command_line_reaches_the_same_options(sites, tmp_path, capsys) -> None:  # noqa: F811
    """``pycriu container options`` prints them, ``pycriu dump --container`` dumps with them, and
    ``pycriu container restore`` hands the images to runc."""
    from pycriu import cli

    source, _ = sites
    ct = source.run(source.ids[0])
    root = ["container", "--runc-root", str(source.runc.root)]
    assert cli.main([*root, "options", ct.id]) == 0
    (tmp_path / "ct.json").write_text(capsys.readouterr().out)
    images = tmp_path / "images"
    images.mkdir()
    (images / DESCRIPTORS_FILE).write_text(json.dumps(["/dev/null"] * 3))
    assert cli.main(["dump", "-t", str(ct.pid), "-D", str(images), "--container", str(tmp_path / "ct.json")]) == 0
    ct.delete(force=True)
    last = source.counter()
    assert cli.main([*root, "restore", ct.id, "-D", str(images), "-b", str(source.bundle)]) == 0
    assert source.running() == [ct.id]
    assert source.wait_counting(above=last) > last
