"""lazy (post-copy): the frozen source's CRIU serves the pages from memory to the destination's
lazy-pages daemon after the destination resumed. No page of anonymous memory touches a disk."""

from __future__ import annotations

import threading
from concurrent.futures import wait
from typing import Any

from ..._threads import spawn
from ...options import PageServerAddress
from .. import procs
from ..errors import TransportError
from ..images import PAGE_SIZE
from ..modes import FLOWS
from ._lazy import abort_lazy, after_lazy_commit, dump_failed, ended, finish_lazy_uncorked, wait_posted
from .base import Flow, FlowContext, FlowResult, all_images, pagemap_counts

__all__ = ["FLOW", "Lazy", "lazy_dump"]


def lazy_dump(run: FlowContext, **dump_kw: Any) -> FlowResult:
    """Post-copy: the frozen source's CRIU serves the pages from memory to the destination's
    lazy-pages daemon after the destination resumed."""
    assert run.client is not None
    port = procs.free_port(run.source_address)
    posted = threading.Event()
    pages_from = run.relay(PageServerAddress(run.source_address, port))

    def post_dump() -> None:
        # the destination starts its lazy-pages daemon as soon as the images it reads arrive
        run.send_images("images", all_images(run), lazy_daemon=pages_from)
        posted.set()

    opts = run.dump_options(lazy_pages=True, lazy_address=run.source_address, lazy_port=port, leave_stopped=True,
                            notify=run.notify(post_dump), **dump_kw)
    dumper = spawn(run.criu.dump, opts, name=f"pycriu-lazy-dump-{run.pid}")
    run.cleanups.append(lambda: wait([dumper], 5))

    def wait_source(timeout: float) -> bool:
        return ended(dumper, timeout)

    try:
        wait_posted(posted, dumper)
        if not procs.wait_listening(port, run.timeout, alive=lambda: not dumper.done()):
            raise TransportError("CRIU's lazy page server did not start listening", log_path=opts.log_path)
        run.restore_and_commit(lazy=True, page_server=pages_from)
    except BaseException as exc:
        if run.custody.may_be_owned:
            # never abort nor resume now: the destination may run on pages this source serves
            after_lazy_commit(run, wait_source, lambda: dump_failed(dumper))
            raise
        if not posted.is_set() and not dumper.done():
            # interrupted while the dump thread is before or inside post-dump: make post-dump fail
            # (CRIU then resumes the tree) and wait for it, so that nobody else uses the channel
            run.cancel.set()
            ended(dumper, run.timeout)
        if posted.is_set():
            abort_lazy(run, dumper, port, f"source failed: {exc!r}")
        raise

    assert run.images is not None
    present, lazy_only, _ = pagemap_counts(run.images)  # after the resume: not in the downtime
    finish_lazy_uncorked(run, port, wait_source, lambda: dump_failed(dumper), total=lazy_only * PAGE_SIZE)
    if dumper.done() and dumper.exception() is None:
        run.record_dump(dumper.result(), stats=False)
        run.note("CRIU's statistics of a lazy dump are not meaningful (zero pages, a bogus frozen time) and "
                 "are left out; the page figures come from the pagemaps")
    return FlowResult.counted(image_pages=present, server_pages=0, lazy_pages=lazy_only)


class Lazy(Flow):
    spec = FLOWS["lazy"]

    def run(self, run: FlowContext) -> FlowResult:
        return lazy_dump(run)


FLOW = Lazy
