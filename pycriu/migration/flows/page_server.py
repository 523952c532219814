"""page-server: the destination's CRIU page server receives the pages during the dump; the
other images follow in post-dump; then restore and commit. Pages are written on the
destination only."""

from __future__ import annotations

from typing import Any

from ..modes import FLOWS
from ..pageprogress import PageProgress
from ..uncork import Uncork
from .base import Flow, FlowContext, FlowResult, all_images

__all__ = ["FLOW", "PageServer", "dump_to_page_server"]


def dump_to_page_server(run: FlowContext, *, parent: str | None = None, **dump_kw: Any) -> FlowResult:
    """The page-server flow's work; also the final dump of pre-copy (into ``parent``'s images)."""
    assert run.client is not None
    with run.phase("page server start"):
        address = run.client.start_page_server("images", parent=parent, tls=bool(run.criu_tls_options()))
    ending = run.rollback_from_images

    def post_dump() -> None:
        run.send_images("images", all_images(run))
        if ending:
            _take_pages_back(run)
        else:
            run.restore_and_commit(lazy=False, page_server=None)

    target = run.relay(address)
    if ending:
        dump_kw["leave_stopped"] = False
    # the pages CRIU streams to the page server, frozen, are the dump's progress
    progress = PageProgress(run.emit, "freeze+dump", enabled=run.progress_wanted, remote_port=target.port)
    with Uncork(target.port) as uncork, progress:  # CRIU 4.2 would stall 200 ms, frozen, at the end of the dump
        run.record_dump(run.criu.dump(run.dump_options(page_server=target, notify=run.notify(post_dump), **dump_kw)))
    if not uncork.done:
        run.note(f"{uncork.note}: the dump may have waited 200 ms for CRIU's corked socket")
    stats = run.dump_stats()
    if ending:
        run.custody.checkpointed()
        run.restore_and_commit(lazy=False, page_server=None)
        run.custody.hand_over()  # already gone: CRIU ended it
    else:
        run.custody.dump_returned()
    return FlowResult.counted(image_pages=0, server_pages=stats.pages_written if stats else 0, lazy_pages=0)


def _take_pages_back(run: FlowContext) -> None:
    """One host (:mod:`..rollback`): the dump will end the source (so that it lets go of its
    ports and memory before the destination restores), and its images must then be complete
    here, pages included, to be its rollback. The pages went to the destination's page server:
    they come back by hard link (the same filesystem), else as a copy, before the source ends."""
    assert run.client is not None and run.images is not None
    with run.phase("page images back"):
        files, linked, copied = run.client.fetch_page_images("images", run.images,
                                                             link=run.client.info.get("link_dev") is not None)
    for path in files:  # a hard link still shared with the destination was written there, not here
        st = path.stat()
        if st.st_nlink > 1:
            run.linked_in.add((st.st_dev, st.st_ino))
    run.note(f"one host: the {len(files)} page images came back from the destination's page server ({linked} bytes "
             f"by hard link, {copied} copied), so that the source's own images are complete before its dump "
             "ends it")


class PageServer(Flow):
    spec = FLOWS["page-server"]

    def run(self, run: FlowContext) -> FlowResult:
        return dump_to_page_server(run)


FLOW = PageServer
