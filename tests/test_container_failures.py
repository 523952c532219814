"""A container migration that cannot work leaves the source container running under its runc,
with the runtime's state consistent on both sides: refused before the freeze when the
destination lacks what the restore needs (a bind-mount source, an agent that may not restore
runc containers), rolled back when the restore itself fails after the freeze."""

from __future__ import annotations

import shutil

import pytest
from container_support import copy_bundle, dest_cgroup_of, needs_runc, sites  # noqa: F401 - fixture
from test_container_migration import agent_command

from pycriu.containers import RuncTarget
from pycriu.migration import MigrationError
from pycriu.migration.runc import migrate_runc

pytestmark = [needs_runc, pytest.mark.containers]


def _migrate(source, dest, ct, agent):  # type: ignore[no-untyped-def]
    target = RuncTarget(bundle=str(dest.bundle), id=ct.id, root=str(dest.root / "runc"))
    # a failed migration keeps its CRIU logs: here, in the test's own directory
    return migrate_runc(ct, "local", "classic", target=target, agent_command=agent,
                        log_dir=source.root.parent / "logs",
                        remap={"paths": {str(source.bundle): str(dest.bundle), str(source.shared): str(dest.shared)}})


def _source_runs_on(source, ct) -> None:  # type: ignore[no-untyped-def]
    assert ct.status == "running"
    source.wait_counting(above=source.counter())
    assert source.sums()[0] == source.sums()[1]


def test_missing_bind_mount_source_is_refused_before_the_freeze(sites) -> None:  # noqa: F811
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    shutil.rmtree(dest.shared)

    with pytest.raises(MigrationError) as info:
        _migrate(source, dest, ct, agent_command(dest.root))

    report = info.value.report
    assert report.outcome == "refused"
    assert f"bind-mount source missing on the destination: /data <- {dest.shared}" in report.error
    _source_runs_on(source, ct)
    assert not (dest.root / "runc").exists() or dest.runc.containers() == []


def test_agent_without_runc_refuses_by_name(sites) -> None:  # noqa: F811
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    agent = [a for a in agent_command() if a != "--runc"]

    with pytest.raises(MigrationError) as info:
        _migrate(source, dest, ct, agent)

    assert info.value.report.outcome == "refused"
    assert "this agent does not restore runc containers (start it with --runc)" in info.value.report.error
    assert "runtime.bundle=" in info.value.report.error  # and the paths it may not name
    _source_runs_on(source, ct)


def test_failed_restore_after_the_freeze_rolls_back(sites) -> None:  # noqa: F811
    source, dest = sites
    ct = source.run(source.ids[0])
    copy_bundle(source.bundle, dest.bundle, dest.shared, cgroups_path=dest_cgroup_of(dest))
    with open(dest.rootfs / "bin" / "busybox", "ab") as fh:  # not the file the source maps
        fh.write(b"\0")

    with pytest.raises(MigrationError) as info:
        _migrate(source, dest, ct, agent_command(dest.root))

    report = info.value.report
    assert report.outcome == "rolled-back", report
    assert "runc restore failed" in report.error
    _source_runs_on(source, ct)
    assert source.runc.containers()[0]["status"] == "running"
    assert dest.runc.containers() == []
    assert not dest.runc.derived_bundle_dir(ct.id).exists()
