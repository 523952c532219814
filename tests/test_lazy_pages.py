"""Lazy migration (post-copy): restore first, fetch memory on demand.

The lazy dump writes the small images, then keeps the tree frozen and serves its memory from a
page server on the source: ``dump()`` blocks until every page has been fetched, so it runs in a
thread here. On the destination ``criu lazy-pages`` fills the restored tree's page faults through
userfaultfd, reading from the source. Two notifications of the dump drive the flow: ``post-dump``
(the images are written) and ``status-ready`` (the source's page server listens).
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from image_support import assert_round_trips, lazy_and_present_pages

import pycriu
from pycriu.workload import Workload

pytestmark = [needs_root, needs_lazy_pages]

WorkloadFactory = Callable[..., Workload]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class LazyDump(threading.Thread):
    """``criu.dump(lazy_pages=True)`` in a thread, with events for its notifications."""

    def __init__(self, criu: pycriu.Criu, opts: pycriu.DumpOptions) -> None:
        super().__init__(daemon=True)
        self.images_written = threading.Event()
        self.serving = threading.Event()
        self.criu = criu
        self.opts = dataclasses.replace(opts, notify=self._notify)
        self.result: pycriu.DumpResult | None = None
        self.error: BaseException | None = None

    def _notify(self, action: str, pid: int) -> None:
        if action == pycriu.NotifyAction.POST_DUMP:
            self.images_written.set()
        elif action == pycriu.NotifyAction.STATUS_READY:
            self.serving.set()

    def run(self) -> None:
        try:
            self.result = self.criu.dump(self.opts)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.images_written.set()
            self.serving.set()


def test_lazy_migration_restores_at_once_and_fetches_memory_from_the_frozen_source(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    mib = 16
    w = workload(mib=mib)
    source_pid = w.pid
    port = free_port()

    dump = LazyDump(criu, pycriu.DumpOptions(
        pid=w.pid, images_dir=src, lazy_pages=True, lazy_port=port, lazy_address="127.0.0.1"))
    dump.start()
    assert dump.images_written.wait(30) and dump.serving.wait(30)
    assert dump.error is None, dump.error

    # The dump has not returned: the source is frozen, alive, and serves its pages.
    assert dump.is_alive()
    assert proc_state(source_pid) == "t"
    # Its memory did not go to disk: the page images hold only the few pages that cannot be lazy.
    on_disk = sum(p.stat().st_size for p in src.glob("pages-*.img"))
    assert on_disk < (mib << 20) // 4

    for image in src.glob("*.img"):
        shutil.copy2(image, dst / image.name)
    # The lazy images are CRIU images like any: they round-trip, and inspect counts the memory
    # left at the source (the workload's pattern at least) apart from the pages they hold.
    assert "PAGEMAP" in assert_round_trips(dst)
    present, lazy = lazy_and_present_pages(dst)
    assert lazy >= mib * 256 and present * 4096 <= on_disk
    with criu.lazy_pages(pycriu.LazyPagesOptions(
            images_dir=dst, page_server=pycriu.PageServerAddress("127.0.0.1", port))) as daemon:
        restored = criu.restore(pycriu.RestoreOptions(images_dir=dst, lazy_pages=True))
        w.adopt(restored.pid)
        # Only the pages from the images were restored eagerly; the rest arrives on demand.
        assert restored.stats is not None
        assert restored.stats.pages_restored * 4096 <= on_disk

        dump.join(60)
        assert not dump.is_alive(), "the lazy dump did not finish after the pages were served"
        assert dump.error is None, dump.error
        assert daemon.wait(timeout=30) == 0

    # Every page was served: the source is gone (dumped trees are killed by default) and the
    # restored tree has all of its memory.
    assert not w.alive(source_pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_lazy_pages_daemon_needs_the_dump_images_first(criu: pycriu.Criu, images_dir: Path) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="no pstree.img"):
        criu.lazy_pages(pycriu.LazyPagesOptions(
            images_dir=images_dir, page_server=pycriu.PageServerAddress("127.0.0.1", free_port())))


def test_the_lazy_daemon_starts_from_the_images_the_migration_sends_it_first(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    """A migration starts ``criu lazy-pages`` as soon as the images for which
    ``lazy_daemon_reads`` is true have arrived, while the others are still being written. Here
    those are complete and every other image is an empty file (one whose transfer has just
    begun): the daemon must still start. (With only the inventory and the process tree sent
    first, it read a task's half-received ``ids`` image: "Unexpected EOF".)"""
    from pycriu.migration.transfer import lazy_daemon_reads

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    w = workload(mib=4, children=2)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=src, leave_running=True))
    first = sorted(p.name for p in src.glob("*.img") if lazy_daemon_reads(p.name))
    assert {"inventory.img", "pstree.img"} < set(first) and any(n.startswith("ids-") for n in first)
    for p in src.glob("*.img"):
        if lazy_daemon_reads(p.name):
            shutil.copy(p, dst / p.name)
        else:
            (dst / p.name).touch()
    with criu.lazy_pages(pycriu.LazyPagesOptions(images_dir=dst, work_dir=tmp_path)) as daemon:
        assert daemon.running
