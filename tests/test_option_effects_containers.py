"""Mount options CRIU acts on, shown on a real runc container (its own mount namespace and
root, a bind mount ``/data`` from the host; see ``container_support``): the container's
options as runc would pass them, less the external-mount declaration of ``/data``, which CRIU
then refuses to dump, unless told to skip that mount or to find external mounts by itself.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from container_support import needs_runc, sites  # noqa: F401 - fixture

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

    for name, given in (("undeclared", {}), ("auto", {"auto_ext_mnt": True}), ("masters", {"ext_masters": True})):
        with pytest.raises(pycriu.DumpError) as info:
            dump(name, **given)
        assert "./data" in (info.value.criu_message or "") and "has unreachable sharing" in (
            info.value.criu_message or ""), name
    mounts = {m.mountpoint: m for m in inspect(dump("skipped", skip_mnt=["/data"])).mounts}
    assert "/data" not in mounts and "/proc" in mounts
    mounts = {m.mountpoint: m for m in inspect(dump("found", auto_ext_mnt=True, ext_masters=True)).mounts}
    assert mounts["/data"].external
    assert ct.status == "running"
