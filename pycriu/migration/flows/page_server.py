"""page-server: the destination's CRIU page server receives the pages during the dump; the
other images follow in post-dump; then restore and commit. Pages are written on the
destination only."""

from __future__ import annotations

from typing import Any

from ..modes import FLOWS
from ..uncork import Uncork
from .base import Flow, FlowContext, FlowResult, all_images

__all__ = ["FLOW", "PageServer", "dump_to_page_server"]


def dump_to_page_server(run: FlowContext, *, parent: str | None = None, **dump_kw: Any) -> FlowResult:
    """The page-server flow's work; also the final dump of pre-copy (into ``parent``'s images)."""
    assert run.client is not None
    with run.phase("page server start"):
        address = run.client.start_page_server("images", parent=parent, tls=bool(run.criu_tls_options()))

    def post_dump() -> None:
        run.send_images("images", all_images(run))
        run.restore_and_commit(lazy=False, page_server=None)

    target = run.relay(address)
    with Uncork(target.port) as uncork:  # CRIU 4.2 would stall 200 ms, frozen, at the end of the dump
        run.record_dump(run.criu.dump(run.dump_options(page_server=target, notify=run.notify(post_dump), **dump_kw)))
    if not uncork.done:
        run.note(f"{uncork.note}: the dump may have waited 200 ms for CRIU's corked socket")
    stats = run.dump_stats()
    run.custody.dump_returned()
    return FlowResult.counted(image_pages=0, server_pages=stats.pages_written if stats else 0, lazy_pages=0)


class PageServer(Flow):
    spec = FLOWS["page-server"]

    def run(self, run: FlowContext) -> FlowResult:
        return dump_to_page_server(run)


FLOW = PageServer
