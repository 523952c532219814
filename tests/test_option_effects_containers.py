"""Mount options CRIU acts on, shown on a real runc container (its own mount namespace and
root, a bind mount ``/data`` from the host; see ``container_support``) and the container's
options as runc would pass them: less the external-mount declaration of ``/data``, which CRIU
then refuses to dump unless told to skip that mount or to find external mounts by itself; with
a file system CRIU does not know; restored by either of CRIU's mount engines.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from container_support import gone, needs_runc, sites  # noqa: F401 - fixture

import pycriu
from pycriu.containers import ContainerOptions
from pycriu.inspect import inspect

pytestmark = [needs_runc, pytest.mark.containers]


def _without_data(options: ContainerOptions) -> ContainerOptions:
    return dataclasses.replace(options, mounts=tuple(m for m in options.mounts if m.mountpoint != "/data"))


def test_skip_mnt_auto_ext_mnt_and_ext_masters_dump_a_bind_mount_nobody_declared(
        sites, tmp_path: Path, criu: pycriu.Criu) -> None:  # noqa: F811
    """``/data`` is a slave of a host mount: undeclared, CRIU refuses it; ``skip_mnt`` leaves it
    out of the images; ``auto_ext_mnt`` finds it external by itself, which CRIU accepts only
    with ``ext_masters`` (its master is outside the container), and neither alone suffices."""
    source, _ = sites
    ct = source.run(source.ids[0])
    options = _without_data(ct.options())

    def dump(name: str, **given: object) -> Path:
        images = tmp_path / name
        images.mkdir()
        criu.dump(options.dump_options(pid=ct.pid, images_dir=images, leave_running=True, **given))
        return images

    # Whether /data is a slave of a host mount depends on where the suite runs: a host whose
    # root is shared (systemd) makes it one; a private mount namespace (unshare --mount, as CI
    # runs the suite) does not, and CRIU then names another reason for the same refusal.
    slave = _is_slave(ct.pid, "/data")
    refusals = (("undeclared", {}), ("auto", {"auto_ext_mnt": True}), ("masters", {"ext_masters": True}))
    for name, given in refusals if slave else refusals[:1]:
        with pytest.raises(pycriu.DumpError) as info:
            dump(name, **given)
        why = info.value.criu_message or ""
        assert "./data" in why, name
        assert ("has unreachable sharing" if slave else "doesn't have a proper root mount") in why, (name, why)
    mounts = {m.mountpoint: m for m in inspect(dump("skipped", skip_mnt=["/data"])).mounts}
    assert "/data" not in mounts and "/proc" in mounts
    mounts = {m.mountpoint: m for m in inspect(dump("found", auto_ext_mnt=True, ext_masters=True)).mounts}
    assert mounts["/data"].external
    assert ct.status == "running"


def _is_slave(pid: int, mountpoint: str) -> bool:
    """Whether ``mountpoint`` in ``pid``'s mount namespace receives propagation from a master."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mountpoint:
            return any(f.startswith("master:") for f in fields[6:fields.index("-")])
    raise AssertionError(f"{mountpoint} is not mounted in {pid}'s namespace")


def test_enable_fs_dumps_a_mount_of_a_file_system_criu_does_not_know(
        sites, tmp_path: Path, criu: pycriu.Criu) -> None:  # noqa: F811
    """A ramfs mounted on the container's /tmp: CRIU refuses a file system it does not know,
    unless enable_fs lets it mount a new one on restore."""
    source, _ = sites
    ct = source.run(source.ids[0])
    subprocess.run(["nsenter", "-t", str(ct.pid), "-m", "/bin/busybox", "mount", "-t", "ramfs", "pycriu-test", "/tmp"],
                   check=True)  # the container's busybox: nsenter -m enters its root too
    options = ct.options()

    def dump(name: str, **given: object) -> Path:
        images = tmp_path / name
        images.mkdir()
        criu.dump(options.dump_options(pid=ct.pid, images_dir=images, leave_running=True, **given))
        return images

    with pytest.raises(pycriu.DumpError) as info:
        dump("unknown")
    assert "FS mnt ./tmp" in (info.value.criu_message or "") and "unsupported" in (info.value.criu_message or "")
    mounts = {m.mountpoint: m for m in inspect(dump("enabled", enable_fs=["ramfs"])).mounts}
    assert mounts["/tmp"].fstype == "ramfs"


def test_mntns_compat_mode_restores_the_mounts_with_criu_s_older_engine(
        sites, tmp_path: Path, criu: pycriu.Criu) -> None:  # noqa: F811
    """The container restores either way (its counter goes on); CRIU's log shows which engine
    made its mounts (mounts-v2 is the default where the kernel has MOVE_MOUNT_SET_GROUP)."""
    source, _ = sites
    ct = source.run(source.ids[0])
    options = ct.options()
    ct.checkpoint(tmp_path / "images")
    logs = {}
    for name, given in (("v2", {}), ("compat", {"mntns_compat_mode": True})):
        last = source.counter()
        with options.restore_options(images_dir=tmp_path / "images", work_dir=tmp_path, log_file=f"{name}.log",
                                     log_level=pycriu.LogLevel.DEBUG, **given) as opts:
            result = criu.restore(opts)
        try:
            assert source.wait_counting(above=last) > last
        finally:
            os.kill(result.pid, signal.SIGKILL)
            gone(result.pid)
        logs[name] = (tmp_path / f"{name}.log").read_text()
    assert "mnt-v2: Create plain mountpoint" in logs["v2"]
    assert "mnt-v2:" not in logs["compat"], "the compat engine used the mounts-v2 code"


def test_ext_sharing_dumps_an_external_mount_shared_with_a_peer_outside(
        sites, tmp_path: Path, criu: pycriu.Criu) -> None:  # noqa: F811
    """The container's /data, left undeclared, is bound ``rshared`` from a host mount that is
    shared: it is a slave of a master outside and a peer of mounts outside. Found external by
    auto_ext_mnt, CRIU accepts it only with both ext_masters and ext_sharing."""
    source, _ = sites
    shared = str(source.shared)
    spec = json.loads((source.bundle / "config.json").read_text())
    data = next(m for m in spec["mounts"] if m["destination"] == "/data")
    data["options"] = ["rbind", "rw", "rshared"]
    (source.bundle / "config.json").write_text(json.dumps(spec))
    subprocess.run(["mount", "--bind", shared, shared], check=True)
    try:
        subprocess.run(["mount", "--make-shared", shared], check=True)
        ct = source.run(source.ids[0])
        options = _without_data(ct.options())

        def dump(name: str, **given: object) -> Path:
            images = tmp_path / name
            images.mkdir()
            criu.dump(options.dump_options(pid=ct.pid, images_dir=images, leave_running=True, auto_ext_mnt=True,
                                           **given))
            return images

        for name, given in (("masters", {"ext_masters": True}), ("sharing", {"ext_sharing": True})):
            with pytest.raises(pycriu.DumpError) as info:
                dump(name, **given)
            assert "./data" in (info.value.criu_message or "") and "has unreachable sharing" in (
                info.value.criu_message or ""), name
        mounts = {m.mountpoint: m for m in inspect(dump("both", ext_masters=True, ext_sharing=True)).mounts}
        assert mounts["/data"].external
    finally:
        subprocess.run(source.runc.argv("delete", "--force", source.ids[0]), capture_output=True, check=False)
        subprocess.run(["umount", shared], check=True)
