"""Each memory-transfer flow moves a live workload to a local agent (a separate process with its
own directories): the workload beats on at the destination with its memory unchanged, the source
is gone, and the report's byte and disk figures are what really lay in the two directories."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import Snapshot, assert_moved

from pycriu import Migration, MigrationReport
from pycriu.migration.images import PAGE_SIZE
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]


MIB = 24
#: An agent that is not told it runs on the source's host: images reach it by copy, as elsewhere.
ELSEWHERE = (sys.executable, "-m", "pycriu.migration.agent", "--stdio")


def _migrate(w: Workload, mode: str, tmp: Path, **kw: object) -> tuple[MigrationReport, Snapshot]:
    snap = Snapshot(tmp)
    report = Migration(w.pid, to="local", mode=mode, log_dir=tmp.parent / "logs", progress=snap, **kw).run()
    return report, snap


def test_classic_moves_every_page_as_image_files(workload: Callable[..., Workload], private_tmp: Path) -> None:
    """To an agent elsewhere (here: one not told it shares the source's host) the images are
    copied over the control connection. (Kept stopped, as between two hosts: the rollback.)"""
    w = workload(mib=MIB)
    report, snap = _migrate(w, "classic", private_tmp, agent_command=ELSEWHERE, same_host_rollback="stopped-source")
    assert_moved(w, report)
    pages = report.pages["in_image_files"]
    assert pages * PAGE_SIZE >= MIB << 20
    # what lay on the source's disk once the images were sent is what the report says, and it
    # all travelled
    assert Snapshot.pages(snap.source) == pages * PAGE_SIZE == report.disk["source"]["page_images"]
    assert Snapshot.pages(snap.destination) == pages * PAGE_SIZE == report.disk["destination"]["page_images"]
    assert snap.linked() == set()
    assert report.bytes["images"] >= sum(snap.source.values())
    assert report.bytes["page_server"] == 0
    assert snap.in_memory == set()
    assert snap.phases()[:4] == ["checks", "freeze+dump", "image transfer", "restore"]
    # then the source gave its page images up, before the restore: the stopped source is the
    # rollback, and the memory their page cache held serves the restore
    assert Snapshot.pages(snap.source_at_restore) == 0
    assert set(snap.source_at_restore) == {n for n in snap.source if not n.startswith("pages-")}


def test_classic_on_one_host_links_the_images_instead_of_copying(workload: Callable[..., Workload],
                                                                 private_tmp: Path) -> None:
    """The local agent shares the source's host and filesystem: it takes every image by hard
    link, so nothing is copied (no second page cache inside the downtime) and the destination
    wrote nothing."""
    w = workload(mib=MIB)
    report, snap = _migrate(w, "classic", private_tmp)
    assert_moved(w, report)
    pages = report.pages["in_image_files"]
    assert Snapshot.pages(snap.destination) == pages * PAGE_SIZE == report.disk["source"]["page_images"]
    assert snap.linked() == set(snap.source) == set(snap.destination)
    assert report.disk["destination"]["page_images"] == report.disk["destination"]["other_images"] == 0
    assert report.bytes["images"] == 0
    assert [n for n in report.notes if "hard link" in n], report.notes


def test_page_server_writes_no_page_on_the_source(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=MIB)
    report, snap = _migrate(w, "page-server", private_tmp)
    assert_moved(w, report)
    assert not [n for n in snap.source if n.startswith(("pages-", "pagemap-"))], snap.source
    assert report.disk["source"]["page_images"] == 0
    pages = report.pages["via_page_server"]
    assert pages * PAGE_SIZE >= MIB << 20
    assert Snapshot.pages(snap.destination) == pages * PAGE_SIZE == report.disk["destination"]["page_images"]
    assert report.bytes["page_server"] == pages * PAGE_SIZE
    # only the small images crossed the control connection
    assert report.bytes["images"] < 1 << 20


def _stamp(log: Path, line: str) -> float:
    """CRIU's timestamp of the first line of ``log`` containing ``line``."""
    text = next(t for t in log.read_text().splitlines() if line in t)
    return float(text[1:text.index(")")])


def test_page_server_dump_does_not_wait_for_the_cork_timer(workload: Callable[..., Workload],
                                                            private_tmp: Path) -> None:
    """CRIU 4.2 leaves its last command to the page server in a corked socket and waits for the
    answer: 200 ms frozen, until the kernel's cork timer fires. pycriu uncorks that socket while
    the dump runs (:mod:`pycriu.migration.uncork`), so the answer comes at once."""
    w = workload(mib=16)
    report, _ = _migrate(w, "page-server", private_tmp)
    assert_moved(w, report)
    assert not [n for n in report.notes if "corked" in n], report.notes
    # From CRIU's close command to its post-dump notification (which pycriu's freeze+dump phase
    # ends with; the phase starts with the pre-dump notification, sent right after CRIU logs
    # "Dumping processes"): the cork timer alone would make this 200 ms or more.
    log = Path(report.logs["source dump"])
    freeze_dump = report.phase("freeze+dump")
    assert freeze_dump is not None
    post_dump = _stamp(log, "Dumping processes") + freeze_dump
    assert post_dump - _stamp(log, "Disconnect from the page server") < 0.15


@needs_lazy_pages
def test_lazy_writes_no_lazy_page_anywhere(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=MIB)
    report, snap = _migrate(w, "lazy", private_tmp)
    assert_moved(w, report)
    lazy = report.pages["lazy"]
    assert lazy * PAGE_SIZE >= MIB << 20
    assert report.bytes["page_server"] == lazy * PAGE_SIZE
    # CRIU writes only the pages that cannot be restored lazily (stack, vDSO, file-backed
    # mappings) into pages-*.img, and both sides keep those in tmpfs: no page touches a disk
    non_lazy = report.pages["in_image_files"] * PAGE_SIZE
    assert snap.in_memory == {"source", "destination"}
    assert Snapshot.pages(snap.source) == non_lazy == report.memory["source"]["page_images"]
    # the local agent took them by hard link (both in the same tmpfs): it wrote none itself
    assert Snapshot.pages(snap.destination) == non_lazy
    assert snap.linked() == set(snap.destination)
    assert report.memory["destination"]["page_images"] == 0
    assert report.disk["source"]["page_images"] == report.disk["destination"]["page_images"] == 0
    assert 0 < non_lazy < (MIB << 20) / 4
    assert report.phase("lazy page completion") is not None


@needs_lazy_pages
@pytest.mark.parametrize(("mode", "server_log"), [("lazy", "source dump"),
                                                  ("page-server-on-source", "source page-server")])
def test_lazy_transfer_end_does_not_wait_for_the_cork_timers(workload: Callable[..., Workload], private_tmp: Path,
                                                              mode: str, server_log: str) -> None:
    """At the end of a lazy transfer CRIU 4.2's lazy-pages daemon sends its close command from a
    corked socket, and the page server answers from another: 2 x 200 ms of cork timers before
    the source may go. pycriu uncorks both sockets once the destination runs, so the source's
    page server sees the session end right after the last page."""
    w = workload(mib=16)
    report, _ = _migrate(w, mode, private_tmp)
    assert_moved(w, report)
    assert not [n for n in report.notes if "corked" in n], report.notes
    log = Path(report.logs[server_log])
    # 16 MiB over loopback take some 10 ms; the two cork timers alone would make this 400 ms
    assert _stamp(log, "Session over") - _stamp(log, "Accepted connection") < 0.3


@needs_lazy_pages
def test_lazy_images_go_to_disk_when_asked(workload: Callable[..., Workload], private_tmp: Path) -> None:
    """``scratch_dir`` (source) and the agent's ``--images-on-disk`` put the non-lazy pages on a
    disk instead of tmpfs, and the report counts them there."""
    w = workload(mib=MIB)
    agent = (sys.executable, "-m", "pycriu.migration.agent", "--stdio", "--images-on-disk")
    report, snap = _migrate(w, "lazy", private_tmp, scratch_dir=private_tmp, agent_command=agent)
    assert_moved(w, report)
    non_lazy = report.pages["in_image_files"] * PAGE_SIZE
    assert snap.in_memory == set()
    assert 0 < report.disk["source"]["page_images"] == report.disk["destination"]["page_images"] == non_lazy
    assert report.memory["source"]["page_images"] == report.memory["destination"]["page_images"] == 0


@needs_lazy_pages
def test_page_server_on_source_serves_pages_from_the_source_disk(workload: Callable[..., Workload],
                                                                   private_tmp: Path) -> None:
    w = workload(mib=MIB)
    report, snap = _migrate(w, "page-server-on-source", private_tmp)
    assert_moved(w, report)
    lazy = report.pages["lazy"]
    non_lazy = report.pages["in_image_files"]
    # the source's dump holds every page ...
    assert Snapshot.pages(snap.source) == (lazy + non_lazy) * PAGE_SIZE == report.disk["source"]["page_images"]
    # ... the destination only the non-lazy ones (a sparse copy, in tmpfs), the rest came lazily
    assert sum(v for k, v in snap.destination_allocated.items() if k.startswith("pages-")) == non_lazy * PAGE_SIZE
    assert snap.in_memory == {"destination"}
    assert report.memory["destination"]["page_images"] == non_lazy * PAGE_SIZE
    assert report.disk["destination"]["page_images"] == 0
    assert report.bytes["page_server"] == lazy * PAGE_SIZE >= MIB << 20
    assert "page server start" in snap.phases()
    assert "source page-server" in report.logs


@needs_lazy_pages
def test_auto_picks_lazy_and_says_why(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=16)
    report, snap = _migrate(w, "auto", private_tmp)
    assert_moved(w, report)
    assert report.requested_mode == "auto"
    assert report.mode == "lazy"
    assert "lazy pages" in report.mode_reason
    # the agent resolved "auto" as the source did: no page on either side's disk
    assert snap.in_memory == {"source", "destination"}
    assert report.disk["destination"]["page_images"] == 0 < Snapshot.pages(snap.destination)


def test_a_tree_with_children_and_threads_moves_whole(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8, children=2, threads=2)
    echoes = w.wait_beats(3)["echoes"]
    report, _ = _migrate(w, "page-server", private_tmp)
    assert_moved(w, report)
    st = w.wait_beats(5)
    assert st["echoes"] > echoes  # the children answer at the destination too
