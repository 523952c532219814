"""pycriu leaves nothing behind: no file descriptor, no ``criu`` child process, no temporary file,
whether an operation succeeds, fails inside CRIU, or is interrupted by the caller.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
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
def counted_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pycriu's temporary files go to a directory only this test uses, so that other processes
    working in /tmp at the same time cannot disturb the count."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_many_operations_leak_no_fd_no_child_and_no_temporary_file(
        criu: pycriu.Criu, images_dir: Path, tmp_path: Path, counted_tmp: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # not a session leader: CRIU refuses it
    fds, kids, temp = open_fds(), children() - {victim.pid}, leftovers()
    try:
        for _ in range(20):
            assert criu.check() is True
            assert criu.version() >= pycriu.required_version()
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


def _swrk_children(expect: int = 0) -> set[int]:
    """Our ``criu swrk`` children; with ``expect``, wait (a little) for that many: a child's
    command line reads empty until its exec has set up the new program."""
    deadline = time.monotonic() + 5
    while True:
        found = _swrk_now()
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.005)


def _swrk_now() -> set[int]:
    found = set()
    for pid in children():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1] == b"swrk":
            found.add(pid)
    return found


def test_a_prestarted_worker_serves_the_next_operation_or_is_discarded(counted_tmp: Path) -> None:
    """:meth:`Criu.prestart` starts the next operation's ``criu swrk`` ahead of time (an agent
    does it before the freeze): the next operation uses it instead of starting one, and
    :meth:`Criu.discard_prestarted` stops it when no operation came. Nothing is left either way."""
    criu = pycriu.Criu()
    criu.version()  # its first, own worker: gone when it returns
    fds = open_fds()
    assert not _swrk_children()

    criu.prestart()
    assert len(_swrk_children(expect=1)) == 1
    criu.version()  # served by the prestarted worker, which then exits and is reaped
    assert not _swrk_children() and open_fds() == fds

    criu.prestart()
    assert len(_swrk_children(expect=1)) == 1
    criu.discard_prestarted()
    assert not _swrk_children() and open_fds() == fds


@pytest.mark.criu
def test_a_successful_migration_leaves_no_log_directory_unless_asked(
        workload: WorkloadFactory, counted_tmp: Path) -> None:
    """Without ``log_dir`` a successful migration removes its logs (a thousand of them leave
    nothing in the temporary directory); ``keep_logs=True`` keeps them, and so does a failure."""
    from pycriu.migration import Migration, Progress

    w = workload(mib=8)
    report = Migration(w.pid, to="local", mode="classic").run()
    w.adopt(report.destination_pid)  # type: ignore[arg-type]
    assert report.log_dir is None and report.logs == {}
    assert any("logs were removed" in n for n in report.notes)
    assert not [p for p in counted_tmp.iterdir() if p.name.startswith("pycriu-migration-")]

    report = Migration(w.pid, to="local", mode="classic", keep_logs=True).run()
    w.adopt(report.destination_pid)  # type: ignore[arg-type]
    assert report.log_dir is not None and Path(report.logs["source dump"]).is_file()
    shutil.rmtree(report.log_dir)

    def fail(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="classic", progress=fail).run()
    failed = info.value.report  # type: ignore[attr-defined]
    w.adopt(failed.source_pid)  # on one host, restored from its images under a new pid
    assert failed.outcome == "rolled-back" and failed.log_dir is not None
    assert Path(failed.logs["source dump"]).is_file()
    shutil.rmtree(failed.log_dir)
