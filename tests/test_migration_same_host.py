"""On one host, a tree that holds host-wide names (a listening TCP port, a Unix socket bound to
a path, a FIFO with data in it) migrates as it does with the CLI (dump, then restore): the dump
ends the source, and its own images are the rollback. Flows that must keep the source stopped
while the destination restores are refused before anything is frozen, naming what is in the way.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root

from pycriu.migration import Migration, PreflightError, Progress
from pycriu.workload import FIFO_DATA, Workload

pytestmark = [needs_root, pytest.mark.criu]

NAMES = ["listen", "unix", "fifo"]


def _workload(workload: Callable[..., Workload], tmp: Path, name: str) -> Workload:
    kwargs = {"listen": {"listen": 0}, "unix": {"unix": tmp / "sock"}, "fifo": {"fifo": tmp / "fifo"}}[name]
    return workload(mib=8, **kwargs)


def _name_works(w: Workload, tmp: Path, name: str) -> None:
    """The migrated (or restored) copy still serves the name it held."""
    if name == "fifo":
        fd = os.open(tmp / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert os.read(fd, 4096) == FIFO_DATA
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


@pytest.mark.parametrize("mode", ["classic", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_a_tree_holding_a_host_wide_name_migrates_on_one_host(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, name: str) -> None:
    w = _workload(workload, private_tmp.parent, name)
    report = Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    assert (report.outcome, report.mode, report.source_state) == ("migrated", "classic", "gone")
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    _name_works(w, private_tmp.parent, name)


@pytest.mark.parametrize("mode", ["page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
@pytest.mark.parametrize("name", NAMES)
def test_flows_that_keep_the_source_stopped_are_refused_before_the_freeze(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, name: str) -> None:
    w = _workload(workload, private_tmp.parent, name)
    before = w.wait_beats(1)
    with pytest.raises(PreflightError, match="on one host the .* flow keeps the source holding") as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    assert info.value.hint is not None and "mode='classic'" in info.value.hint
    assert len(info.value.resources) == 1
    report = info.value.report  # type: ignore[attr-defined]
    assert (report.outcome, report.source_state) == ("refused", "running (never frozen)")
    after = w.wait_beats(3)
    assert after["beat"] > before["beat"]
    _name_works(w, private_tmp.parent, name)


@pytest.mark.parametrize("name", NAMES)
def test_a_failure_after_the_dump_brings_the_source_back_from_its_own_images(
        workload: Callable[..., Workload], private_tmp: Path, name: str) -> None:
    """Ctrl-C as the destination's restore begins, after the dump ended the source: the source is
    restored from its images on this host, with its memory and its name, and only that copy runs."""
    w = _workload(workload, private_tmp.parent, name)

    def fail_at_restore(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            raise KeyboardInterrupt  # (a progress callback's Exception is ignored; Ctrl-C is not)

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="classic", log_dir=private_tmp.parent / "logs",
                  progress=fail_at_restore).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    assert report.rollback.startswith("restored from the source's own images"), report.rollback
    assert report.destination_state in ("none", "killed", "gone")
    assert report.source_pid is not None and report.source_pid != w.pid
    w.adopt(report.source_pid)
    assert report.source_state == "running"
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    _name_works(w, private_tmp.parent, name)
