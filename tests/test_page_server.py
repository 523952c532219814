"""Dumping straight to CRIU's page server: memory pages go over TCP to the destination directory,
and only the small non-page images are written on the source.

The page server is CRIU's own ``criu page-server`` process, owned by a context manager that
always stops and reaps it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root
from image_support import assert_round_trips, lazy_and_present_pages

import pycriu
from pycriu.workload import Workload

pytestmark = needs_root

WorkloadFactory = Callable[..., Workload]


def gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` has exited and been reaped (no /proc entry left, not even a zombie)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def src_dst(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


def test_pages_go_to_the_page_server_and_the_tree_restores_from_there(
        criu: pycriu.Criu, workload: WorkloadFactory, src_dst: tuple[Path, Path]) -> None:
    src, dst = src_dst
    w = workload(mib=16)

    with criu.page_server(pycriu.PageServerOptions(images_dir=dst, port=0)) as ps:
        # Started with port=0, the page server took a free port, read back from CRIU's log.
        assert ps.port > 0
        assert ps.pid > 0 and ps.running
        assert ps.address == pycriu.PageServerAddress("127.0.0.1", ps.port)
        dumped = criu.dump(pycriu.DumpOptions(
            pid=w.pid, images_dir=src, page_server=pycriu.PageServerAddress("127.0.0.1", ps.port)))
        # The page server exits by itself once the dump has sent everything.
        assert ps.wait(timeout=30) == 0

    assert dumped.stats is not None and dumped.stats.pages_written >= 16 * 256
    assert not list(src.glob("pages-*.img")), "no page image may be written on the source"
    assert list(dst.glob("pages-*.img")) and list(dst.glob("pagemap-*.img"))
    # Everything else (process tree, cores, fds, ...) stayed on the source: bring it over.
    assert (src / "pstree.img").exists() and not (dst / "pstree.img").exists()
    for image in src.glob("*.img"):
        if not (dst / image.name).exists():
            shutil.copy2(image, dst / image.name)
    # the page server's pagemaps and the source's images round-trip; inspect sees every page
    assert {"PAGEMAP", "CORE", "MM"} <= assert_round_trips(dst)
    present, lazy = lazy_and_present_pages(dst)
    assert present == dumped.stats.pages_written and lazy == 0

    restored = criu.restore(pycriu.RestoreOptions(images_dir=dst))
    w.adopt(restored.pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_a_fixed_port_is_used_as_given(criu: pycriu.Criu, src_dst: tuple[Path, Path]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with criu.page_server(pycriu.PageServerOptions(images_dir=src_dst[1], port=port)) as ps:
        assert ps.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens there


def test_a_status_fd_gets_one_byte_once_the_server_listens(criu: pycriu.Criu, src_dst: tuple[Path, Path]) -> None:
    """``status_fd``, as ``criu page-server --status-fd``: one zero byte when it is ready (a
    runtime waits on it); by then a connection succeeds."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        with criu.page_server(pycriu.PageServerOptions(images_dir=src_dst[1], status_fd=w)) as ps:
            assert os.read(r, 16) == b"\0"
            with socket.create_connection(("127.0.0.1", ps.port), timeout=5):
                pass
    finally:
        os.close(r)
        os.close(w)


def test_a_status_fd_that_is_not_an_fd_is_refused(src_dst: tuple[Path, Path]) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="status_fd"):
        pycriu.PageServerOptions(images_dir=src_dst[1], status_fd=-1)


def test_the_page_server_is_stopped_and_reaped_after_the_with_block(
        criu: pycriu.Criu, src_dst: tuple[Path, Path]) -> None:
    ps = criu.page_server(pycriu.PageServerOptions(images_dir=src_dst[1], port=0))
    with ps:
        pid = ps.pid
        assert os.path.exists(f"/proc/{pid}")
    # Nobody dumped to it, so it was still waiting: the with-block stopped it.
    assert gone(pid)
    assert not ps.running


def test_the_page_server_is_stopped_and_reaped_when_the_body_raises(
        criu: pycriu.Criu, src_dst: tuple[Path, Path]) -> None:
    class Abort(Exception):
        pass

    pid = 0
    with pytest.raises(Abort):
        with criu.page_server(pycriu.PageServerOptions(images_dir=src_dst[1], port=0)) as ps:
            pid = ps.pid
            raise Abort
    assert pid > 0 and gone(pid)


def test_a_page_server_context_manager_cannot_be_entered_twice(
        criu: pycriu.Criu, src_dst: tuple[Path, Path]) -> None:
    ps = criu.page_server(pycriu.PageServerOptions(images_dir=src_dst[1], port=0))
    with ps:
        with pytest.raises(RuntimeError, match="re-entered"):
            ps.__enter__()
    with pytest.raises(RuntimeError, match="re-entered"):
        ps.__enter__()


def test_the_page_server_needs_an_existing_directory(criu: pycriu.Criu, tmp_path: Path) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="not an existing directory"):
        criu.page_server(pycriu.PageServerOptions(images_dir=tmp_path / "missing", port=0))
