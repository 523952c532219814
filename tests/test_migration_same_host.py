"""On one host, a tree that holds host-wide names (a listening TCP port, a Unix socket bound to
a path, a FIFO with data in it, a file lock) migrates in every flow the CLI can run with it: the
dump ends the source, and its own images on this host are the rollback (page-server gets its
pages back from the destination's page server first). Lazy, which would serve pages from the
frozen source's memory while it still holds them, runs as page-server-on-source (post-copy from
the images). Whatever fails, exactly one copy runs, with its memory and its name.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_lazy_pages, needs_root

import pycriu
from pycriu.migration import Migration, Progress, procs
from pycriu.workload import FIFO_DATA, Workload

pytestmark = [needs_root, pytest.mark.criu]

NAMES = ["listen", "unix", "fifo", "lock"]
LAZY_MODES = [pytest.param("lazy", marks=needs_lazy_pages),
              pytest.param("page-server-on-source", marks=needs_lazy_pages)]
#: requested mode -> the flow that runs
MODES = {"classic": "classic", "page-server": "page-server", "lazy": "page-server-on-source",
         "page-server-on-source": "page-server-on-source", "auto": "page-server-on-source"}


def _workload(workload: Callable[..., Workload], tmp: Path, name: str) -> Workload:
    kwargs = {"listen": {"listen": 0}, "unix": {"unix": tmp / "sock"}, "fifo": {"fifo": tmp / "fifo"},
              "lock": {"lock": tmp / "lock"}}[name]
    return workload(mib=8, **kwargs)


def _migration(w: Workload, tmp: Path, name: str, mode: str, **kw: object) -> Migration:
    flags = {"file_locks": True} if name == "lock" else None
    return Migration(w.pid, to="local", mode=mode, log_dir=tmp / "logs", flags=flags, **kw)  # type: ignore[arg-type]


def _name_works(w: Workload, tmp: Path, name: str) -> None:
    """The migrated (or restored) copy still serves the name it held."""
    if name == "fifo":
        fd = os.open(tmp / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert os.read(fd, 4096) == FIFO_DATA
        finally:
            os.close(fd)
        return
    if name == "lock":
        fd = os.open(tmp / "lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the restored copy holds it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert procs.tree_resources(w.pid).locks, "the migrated tree holds no lock"
        finally:
            os.close(fd)
        return
    if name == "listen":
        port = int(w.wait_beats(1)["port"])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(tmp / "sock"))
    with sock:
        assert sock.recv(100).startswith(b"alive ")


@pytest.mark.parametrize("mode", ["classic", "page-server", *LAZY_MODES, pytest.param("auto", marks=needs_lazy_pages)])
@pytest.mark.parametrize("name", NAMES)
def test_a_tree_holding_a_host_wide_name_migrates_on_one_host(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, name: str) -> None:
    tmp = private_tmp.parent
    w = _workload(workload, tmp, name)
    report = _migration(w, tmp, name, mode).run()
    assert (report.outcome, report.mode, report.source_state) == ("migrated", MODES[mode], "gone"), report
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    _name_works(w, tmp, name)
    if mode == "page-server":
        assert any("page images came back" in n for n in report.notes), report.notes
    if mode in ("lazy", "auto"):
        assert "page-server-on-source restores lazily too" in report.mode_reason


@pytest.mark.parametrize("mode", ["classic", "page-server", *LAZY_MODES])
@pytest.mark.parametrize("name", NAMES)
def test_a_failure_after_the_dump_brings_the_source_back_from_its_own_images(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, name: str) -> None:
    """Ctrl-C as the destination's restore begins, after the dump ended the source: the source is
    restored from its images on this host, with its memory and its name, and only that copy runs."""
    tmp = private_tmp.parent
    w = _workload(workload, tmp, name)

    def fail_at_restore(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            raise KeyboardInterrupt  # (a progress callback's Exception is ignored; Ctrl-C is not)

    with pytest.raises(KeyboardInterrupt) as info:
        _migration(w, tmp, name, mode, progress=fail_at_restore).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    assert report.rollback.startswith("restored from the source's own images"), report.rollback
    assert report.destination_state in ("none", "killed", "gone")
    assert report.source_pid is not None and report.source_pid != w.pid
    w.adopt(report.source_pid)
    assert report.source_state == "running"
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    _name_works(w, tmp, name)


@pytest.mark.parametrize("mode", ["classic", "page-server", *LAZY_MODES])
def test_a_restore_that_cannot_bind_brings_the_source_back(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    """Another process takes the port after the dump ended the source: CRIU's restore on the
    destination fails ("Address already in use"); once the port is free again the source comes
    back from its own images, still serving it."""
    tmp = private_tmp.parent
    w = _workload(workload, tmp, "listen")
    port = int(w.wait_beats(1)["port"])
    squatter: list[socket.socket] = []

    def squat(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
            squatter.append(sock)
        elif e.phase == "restore" and e.event == "end":
            for sock in squatter:
                sock.close()

    try:
        with pytest.raises(Exception, match="restore") as info:
            _migration(w, tmp, "listen", mode, progress=squat).run()
    finally:
        for sock in squatter:
            sock.close()
    assert squatter, "the restore never started"
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    assert report.rollback.startswith("restored from the source's own images"), report.rollback
    assert report.destination_state in ("none", "killed", "gone")
    assert report.source_pid is not None
    w.adopt(report.source_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    _name_works(w, tmp, "listen")


@pytest.mark.parametrize("mode", ["classic", "page-server", *LAZY_MODES])
def test_the_images_as_rollback_can_be_asked_for_any_tree(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    """``same_host_rollback="images"``: the dump ends even a tree that holds no name (no second
    copy of its memory while the destination restores); a failure as the restore begins brings it
    back from those images, memory intact."""
    tmp = private_tmp.parent
    w = workload(mib=8)
    report = Migration(w.pid, to="local", mode=mode, log_dir=tmp / "logs", same_host_rollback="images").run()
    assert (report.outcome, report.mode, report.source_state) == ("migrated", MODES[mode], "gone"), report
    assert report.rollback_plan == "the source's images"
    assert any("same_host_rollback='images'" in n for n in report.notes), report.notes
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum

    def fail_at_restore(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode=mode, log_dir=tmp / "logs2", same_host_rollback="images",
                  progress=fail_at_restore).run()
    failed = info.value.report  # type: ignore[attr-defined]
    assert failed.outcome == "rolled-back", failed
    assert failed.rollback.startswith("restored from the source's own images"), failed.rollback
    assert failed.source_pid is not None
    w.adopt(failed.source_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


@pytest.mark.parametrize(("mode", "plan"), [("classic", "the source's images"), ("page-server", "the source's images"),
                                          pytest.param("lazy", "the stopped source", marks=needs_lazy_pages)])
def test_by_default_the_flows_that_can_end_the_source_do(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, plan: str) -> None:
    """As criu dump does, so that the restore reuses the source's memory; lazy serves its pages
    from the frozen source and keeps it."""
    w = workload(mib=8)
    report = Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    assert (report.outcome, report.mode, report.rollback_plan) == ("migrated", mode, plan), report
    assert f"rollback plan:   {plan}" in str(report)
    if mode == "page-server":  # its pages came back by hard link: written once, on the destination
        assert report.disk["source"]["page_images"] == 0 and report.disk["destination"]["page_images"] > 8 << 20
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_with_link_remap_the_default_keeps_the_stopped_source(
        workload: Callable[..., Workload], private_tmp: Path) -> None:
    """Deleted open files kept as links, which the destination's restore removes: the images
    could not bring them back after a later failure, the stopped source still holds them."""
    w = workload(mib=8)
    report = Migration(w.pid, to="local", mode="classic", flags={"link_remap": True},
                       log_dir=private_tmp.parent / "logs").run()
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    assert (report.outcome, report.rollback_plan) == ("migrated", "the stopped source"), report
    assert any("link_remap" in n for n in report.notes), report.notes
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


@pytest.mark.parametrize("mode", ["classic", "page-server"])
def test_the_stopped_source_can_be_kept_as_the_rollback(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    """``same_host_rollback="stopped-source"``: nothing to restore after a failure; the source,
    frozen until then, runs again under its own pid."""
    w = workload(mib=8)

    def fail_at_restore(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs",
                  same_host_rollback="stopped-source", progress=fail_at_restore).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert (report.outcome, report.rollback_plan, report.source_pid) == ("rolled-back", "the stopped source", w.pid)
    # resumed by pycriu (SIGCONT) or by CRIU (the failure came inside its dump): never restored
    assert report.rollback and "images" not in report.rollback, report.rollback
    assert report.source_state == "running"
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_a_kept_source_holding_a_port_is_refused_before_the_freeze(
        workload: Callable[..., Workload], private_tmp: Path) -> None:
    """``same_host_rollback="stopped-source"`` with a listening port: the destination could not
    bind it while the source holds it; refused before anything is frozen, the server never stops."""
    from pycriu.migration.errors import PreflightError

    tmp = private_tmp.parent
    w = _workload(workload, tmp, "listen")
    with pytest.raises(PreflightError, match="'stopped-source' keeps the source holding listening TCP port") as info:
        _migration(w, tmp, "listen", "classic", same_host_rollback="stopped-source").run()
    assert info.value.report.outcome == "refused"  # type: ignore[attr-defined]
    assert "freeze" not in info.value.report.marks  # type: ignore[attr-defined]
    w.wait_beats(3)
    _name_works(w, tmp, "listen")


class _InterruptedAfterTheDump(pycriu.Criu):
    """A Ctrl-C that came while CRIU dumped is held back until the dump returns (pycriu blocks
    it so that libcriu's answer is not lost): by then a dump that ends the source has ended it."""

    def dump(self, *args: Any, **kwargs: Any) -> Any:
        super().dump(*args, **kwargs)
        raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["classic", "page-server", *LAZY_MODES[1:]])
def test_a_ctrl_c_as_the_dump_ends_the_source_restores_it_from_its_images(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    w = workload(mib=8)
    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs",
                  criu=_InterruptedAfterTheDump()).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    assert report.rollback.startswith("restored from the source's own images"), report.rollback
    assert report.source_pid is not None and report.source_pid != w.pid
    w.adopt(report.source_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


class _InterruptedAgainInTheRollback(_InterruptedAfterTheDump):
    """Then the user presses Ctrl-C again while the source is being restored from its images."""

    def restore(self, *args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python runs the SIGINT handler here, before CRIU restores anything
        return super().restore(*args, **kwargs)


def test_a_second_ctrl_c_waits_for_the_restore_from_the_images(
        workload: Callable[..., Workload], private_tmp: Path, ctrl_c: None) -> None:
    """A rollback once begun is finished: without that, the second Ctrl-C left neither the
    source nor a restored copy, and the images were deleted."""
    w = workload(mib=8)
    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="classic", log_dir=private_tmp.parent / "logs",
                  criu=_InterruptedAgainInTheRollback()).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    assert report.source_pid is not None and report.source_pid != w.pid
    w.adopt(report.source_pid)
    assert any("Ctrl-C again during the rollback" in n for n in report.notes), report.notes
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_page_server_keeps_the_stopped_source_when_the_scratch_is_on_another_filesystem(
        workload: Callable[..., Workload], private_tmp: Path) -> None:
    """The source's images in /dev/shm, the local agent's in the temporary directory: the pages
    could come back only as a copy inside the freeze, so ``auto`` keeps the stopped source."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(private_tmp).st_dev:
        pytest.skip("/dev/shm is not a filesystem of its own here")
    scratch = Path(tempfile.mkdtemp(prefix="pycriu-test-", dir=shm))
    try:
        w = workload(mib=8)
        report = Migration(w.pid, to="local", mode="page-server", log_dir=private_tmp.parent / "logs",
                           scratch_dir=scratch).run()
        assert report.destination_pid is not None
        w.adopt(report.destination_pid)
        assert (report.outcome, report.rollback_plan) == ("migrated", "the stopped source"), report
        assert any("another filesystem" in n for n in report.notes), report.notes
        assert not any("page images came back" in n for n in report.notes), report.notes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
