"""restore_sibling: the restored tree becomes a child of the caller (libcriu's restore_child)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import needs_root

import pycriu
from pycriu.workload import Workload

pytestmark = needs_root


def test_restored_tree_is_our_child(criu: pycriu.Criu, workload: Callable[..., Workload], images_dir: Path) -> None:
    w = workload(mib=8)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    result = criu.restore(pycriu.RestoreOptions(images_dir=images_dir, restore_sibling=True))
    w.adopt(result.pid)
    ppid = int(Path(f"/proc/{result.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid()
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_restore_sibling_refuses_a_criu_that_is_not_on_path(tmp_path: Path, images_dir: Path) -> None:
    other = tmp_path / "criu"
    other.symlink_to("/bin/true")
    (images_dir / "inventory.img").write_bytes(b"")
    criu = pycriu.Criu(binary=other)
    try:
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir, restore_sibling=True))
    except pycriu.InvalidOptionError as exc:
        assert "from PATH" in str(exc)
    else:
        raise AssertionError("restore_sibling with a criu that is not on PATH was not refused")
