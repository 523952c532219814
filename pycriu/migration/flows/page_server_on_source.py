"""page-server-on-source: the source dumps to its own disk; in post-dump it sends the non-page
images (and the few non-lazy pages, as a sparse page image), starts ``criu page-server
--lazy-pages`` over its images and has the destination restore lazily from it."""

from __future__ import annotations

from concurrent.futures import wait
from typing import Any

from ..._threads import spawn
from ...options import PageServerAddress, PageServerOptions
from .. import procs
from ..images import PAGE_SIZE, list_images, non_lazy_ranges, pagemaps
from ..modes import FLOWS
from ._lazy import after_lazy_commit, finish_lazy_uncorked
from .base import Flow, FlowContext, FlowResult, pagemap_counts

__all__ = ["FLOW", "PageServerOnSource"]


class PageServerOnSource(Flow):
    spec = FLOWS["page-server-on-source"]

    def run(self, run: FlowContext) -> FlowResult:
        return _run(run)


def _run(run: FlowContext) -> FlowResult:
    """The source dumps to its own disk; in post-dump it sends the non-page images (and the few
    non-lazy pages, as a sparse page image), starts ``criu page-server --lazy-pages`` over its
    images and has the destination restore lazily from it."""
    assert run.client is not None and run.images is not None and run.src_logs is not None
    holder: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    port = procs.free_port(run.source_address)
    # one host (rollback.py): the dump ends the source and the destination
    # restores after it (the complete images here are the rollback, and what the page server serves)
    ending = run.rollback_from_images
    pages_from = run.relay(PageServerAddress(run.source_address, port))

    def start_page_server() -> None:
        assert run.images is not None and run.src_logs is not None
        ps = run.criu.page_server(PageServerOptions(images_dir=run.images, work_dir=run.src_logs,
                                                    lazy_pages=True, address=run.source_address, port=port,
                                                    timeout=run.timeout, **run.criu_tls_options()))
        holder["ps"] = ps  # before the start: stopped at the end even if its start fails
        ps.start()

    def post_dump() -> None:
        assert run.images is not None and run.src_logs is not None
        # CRIU's page server starts over the local images while the other images travel, and
        # the destination's lazy-pages daemon starts as soon as the images it reads arrived
        run.phase_start("page server start")
        starter = spawn(start_page_server, name="pycriu-page-server-start")
        try:
            maps = {pm.pages_name: pm for pm in pagemaps(run.images)}
            files: list[tuple[str, Any, list[tuple[int, int]] | None]] = []
            for img in list_images(run.images):
                pm = maps.get(img.name)
                files.append((img.name, img.path, non_lazy_ranges(pm) if pm is not None else None))
            present, _, both = pagemap_counts(run.images)
            sizes.update(present=present, lazy=both)
            run.send_images("images", files, lazy_daemon=pages_from,
                            detail=f"{len(files)} files; page images sparse: only the {present} non-lazy pages")
        finally:
            wait([starter])
            if "ps" in holder:
                run.cleanups.append(lambda: _stop(holder["ps"]))
            run.phase_end("page server start", "concurrent with the image transfer" if starter.exception() is None
                          else "(failed)")
        starter.result()  # raises what the start raised
        if not ending:
            run.restore_and_commit(lazy=True, page_server=pages_from)

    run.record_dump(run.criu.dump(run.dump_options(leave_stopped=not ending, notify=run.notify(post_dump))))
    ps = holder["ps"]
    run.report.logs["source page-server"] = str(ps.log_path)

    def wait_source(timeout: float) -> bool:
        try:
            ps.wait(timeout)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - failed: see source_failed
            holder["failed"] = True
        return True

    if ending:
        run.custody.checkpointed()
        try:
            run.restore_and_commit(lazy=True, page_server=pages_from)
        except BaseException:
            if run.custody.may_be_owned:  # the destination may run on pages this page server serves
                after_lazy_commit(run, wait_source, lambda: bool(holder.get("failed")))
            raise
    elif run.custody.deferred is not None:  # post-dump failed after the commit was sent
        try:
            after_lazy_commit(run, wait_source, lambda: bool(holder.get("failed")))
        finally:
            run.custody.raise_deferred()
    finish_lazy_uncorked(run, port, wait_source, lambda: bool(holder.get("failed")),
                         total=sizes["lazy"] * PAGE_SIZE if "lazy" in sizes else None)
    return FlowResult.counted(image_pages=sizes.get("present", 0), server_pages=0, lazy_pages=sizes.get("lazy", 0))


def _stop(daemon: Any) -> None:
    daemon.stop(grace=1.0)


FLOW = PageServerOnSource
