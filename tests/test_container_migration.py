"""A real runc container migrates with ``Migration`` to a local agent in every flow this kernel
allows, and runc owns it on the destination: ``runc restore`` on the images pycriu moved, held
stopped until the commit. After each, the destination's runc lists it running in its own cgroup,
the counter goes on from where the source stopped, the memory is intact, and the source's runc
has forgotten it (exactly one copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_lazy_pages
from container_support import copy_bundle, dest_cgroup_of, final_sync, gone, needs_runc, sites  # noqa: F401 - fixture

from pycriu import Migration
from pycriu.containers import RuncTarget
from pycriu.migration.runc import migrate_runc

pytestmark = [needs_runc, pytest.mark.containers]

FLOWS = ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
         pytest.param("page-server-on-source", marks=needs_lazy_pages)]


def agent_command(*allowed: os.PathLike[str] | str) -> list[str]:
    """A local agent that may restore runc containers whose paths are under ``allowed``."""
    argv = [sys.executable, "-m", "pycriu.migration.agent", "--stdio", "--same-host", "--runc"]
    for path in allowed:
        argv += ["--container-path", str(path)]
    return argv


@pytest.mark.parametrize("mode", FLOWS)
def test_runc_container_migrates(sites, mode: str) -> None:  # noqa: F811
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    pid = ct.pid

    # the options runc itself would use, their restore half remapped to the "destination host"
    options = ct.options().remap(paths={str(source.bundle): str(dest.bundle), str(source.shared): str(dest.shared)})
    target = RuncTarget(bundle=str(dest.bundle), id=ct.id, root=str(dest.root / "runc"))

    report = Migration(pid, "local", mode, container=options, runtime=target,
                       agent_command=agent_command(dest.root), progress=final_sync(source.bundle, dest.bundle)).run()

    assert report.outcome == "migrated", report
    assert source.runc.state(ct.id)["status"] == "stopped"  # type: ignore[index]  # the source's runc saw it end
    ct.delete()  # as runc checkpoint does: pycriu.migration.runc.migrate_runc does both
    last = source.counter()  # the source stopped at the freeze: its last value
    assert dest.running() == [ct.id]
    assert source.runc.containers() == []
    assert gone(pid)
    assert dest.wait_counting(above=last) > last
    sum0, now = dest.sums()
    assert now == sum0, "the restored container's memory differs"
    restored = dest.runc.state(ct.id)
    assert restored is not None and restored["status"] == "running"
    cgroup = open(f"/proc/{restored['pid']}/cgroup").read()
    assert dest_cgroup_of(dest) in cgroup
    assert source.counter() == last  # and nothing runs on at the source


def test_migrate_runc_does_runcs_bookkeeping(sites) -> None:  # noqa: F811
    """``migrate_runc`` derives and remaps the options, migrates (``auto``: the best flow both
    hosts support) and deletes the container from the source's runc once the destination runs it."""
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    target = RuncTarget(bundle=str(dest.bundle), id=ct.id, root=str(dest.root / "runc"))
    report = migrate_runc(ct, "local", target=target,
                          remap={"paths": {str(source.bundle): str(dest.bundle), str(source.shared): str(dest.shared)}},
                          agent_command=agent_command(dest.root), progress=final_sync(source.bundle, dest.bundle))
    assert report.outcome == "migrated"
    assert source.runc.state(ct.id) is None and dest.running() == [ct.id]
    dest.wait_counting(above=source.counter())


def test_container_options_migrate_without_a_runtime(sites) -> None:  # noqa: F811
    """A runtime that embeds pycriu migrates with ContainerOptions alone: the agent restores the
    container itself, with the remapped root, mount sources and cgroups it allows."""
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    options = ct.options().remap(paths={str(source.bundle): str(dest.bundle), str(source.shared): str(dest.shared)},
                                 cgroups={"/": dest_cgroup_of(dest)})
    agent = [a for a in agent_command(dest.root) if a != "--runc"] + ["--container-cgroup", dest_cgroup_of(dest)]
    # the destination's operator prepares the cgroup parent, as runc's Apply does (a cpuset
    # child needs its parent's cpus and mems)
    cpuset = Path("/sys/fs/cgroup/cpuset")
    if cpuset.is_dir():
        parent = cpuset / dest_cgroup_of(dest).lstrip("/")
        parent.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            (parent / name).write_text((cpuset / name).read_text())

    report = Migration(ct.pid, "local", "classic", container=options, agent_command=agent,
                       progress=final_sync(source.bundle, dest.bundle)).run()

    assert report.outcome == "migrated" and report.destination_pid is not None
    try:
        assert dest.wait_counting(above=source.counter()) > 0
        assert dest.sums()[0] == dest.sums()[1]
        assert dest_cgroup_of(dest) in open(f"/proc/{report.destination_pid}/cgroup").read()
    finally:
        os.kill(report.destination_pid, 9)
        gone(report.destination_pid)


@pytest.mark.skipif(os.environ.get("PYCRIU_CGROUP2_VIEW") == "1", reason="already the cgroup v2 view")
def test_on_a_cgroup_v2_host_the_container_lands_in_the_destination_s_cgroup() -> None:
    """Debian 12 mounts cgroup v2 alone, and runc names CRIU no cgroup root there: the container
    came back in its source's cgroup (found in the test VM). The two migrations above, in a
    mount namespace whose /sys/fs/cgroup is the cgroup2 hierarchy alone, as such a host has it
    (on a v2 host they already ran so)."""
    from pycriu.containers.runc import _unified  # noqa: PLC2701 - how runc tells the layout

    if _unified():
        pytest.skip("this host mounts cgroup v2 alone: the tests above ran on it")
    view = "umount -R /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\""
    tests = [f"{__file__}::test_runc_container_migrates[classic]",
             f"{__file__}::test_container_options_migrate_without_a_runtime"]
    r = subprocess.run(["unshare", "--mount", "sh", "-c", view, "sh", sys.executable, "-m", "pytest", "-q",
                        "-p", "no:cacheprovider", *tests], env=dict(os.environ, PYCRIU_CGROUP2_VIEW="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
