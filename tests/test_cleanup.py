"""pycriu leaves nothing behind: no file descriptor, no ``criu`` child process, no temporary file,
whether an operation succeeds, fails inside CRIU, or is interrupted by the caller.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu.workload import Workload

pytestmark = needs_root

WorkloadFactory = Callable[..., Workload]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def children() -> set[int]:
    """Pids of this process's children (of every thread), zombies included."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            pids.update(int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split())
        except OSError:
            continue
    return pids


def leftovers() -> set[str]:
    """pycriu's temporary config files and scratch log directories."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("pycriu-*")}


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pycriu's temporary files go to a directory only this test uses, so that other processes
    working in /tmp at the same time cannot disturb the count."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_many_operations_leak_no_fd_no_child_and_no_temporary_file(
        criu: pycriu.Criu, images_dir: Path, tmp_path: Path, private_tmp: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # not a session leader: CRIU refuses it
    fds, kids, temp = open_fds(), children() - {victim.pid}, leftovers()
    try:
        for _ in range(20):
            assert criu.check() is True
            assert criu.version() >= (4, 2)
        assert criu.features(refresh=True).lazy_pages
        # A dump that fails inside CRIU, with a config file (display_stats) to write and remove.
        with pytest.raises(pycriu.DumpError):
            criu.dump(pycriu.DumpOptions(pid=victim.pid, images_dir=images_dir, display_stats=False))
        # A restore that fails inside CRIU.
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "inventory.img").write_bytes(b"garbage")
        with pytest.raises(pycriu.RestoreError):
            criu.restore(pycriu.RestoreOptions(images_dir=bad))
        # A binary that is not CRIU: the worker dies at once.
        with pytest.raises(pycriu.ServiceError):
            pycriu.Criu(binary="/bin/false").check()
        # A page server that starts and stops, and one that cannot start.
        with criu.page_server(pycriu.PageServerOptions(images_dir=tmp_path, port=0)) as ps:
            with pytest.raises(pycriu.PageServerError):
                with criu.page_server(pycriu.PageServerOptions(images_dir=tmp_path, port=ps.port)):
                    pass
    finally:
        victim.kill()
        victim.wait()

    assert open_fds() == fds
    assert children() == kids
    assert leftovers() == temp


def test_a_notify_callback_exception_leaks_nothing(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)
    fds, kids = open_fds(), children()

    def fail(action: str, pid: int) -> None:
        if action == "post-dump":
            raise RuntimeError("no")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, display_stats=False, notify=fail))

    assert open_fds() == fds
    assert children() == kids
    w.wait_beats(2)


@pytest.mark.parametrize("action", ["pre-dump", "post-dump"])
def test_keyboard_interrupt_in_a_notify_callback_propagates_and_the_tree_survives(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path, action: str) -> None:
    """Ctrl-C while CRIU waits on the callback: CRIU is told to roll back, the dumped tree is
    resumed, and only then does ``KeyboardInterrupt`` reach the caller."""
    w = workload(mib=8)
    fds, kids = open_fds(), children()

    def interrupted(seen: str, pid: int) -> None:
        if seen == action:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=interrupted))

    assert w.alive()
    w.wait_beats(5)
    assert w.checksum() == w.expected_checksum
    assert open_fds() == fds
    assert children() == kids


def test_the_next_operation_after_an_interrupt_works(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)

    def interrupted(action: str, pid: int) -> None:
        if action == "post-dump":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=interrupted))
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
