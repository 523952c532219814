"""classic: dump to the source's disk; in post-dump send every image (pages included) over the
control channel, restore and commit. Pages are written on both hosts."""

from __future__ import annotations

from ..modes import FLOWS
from .base import Flow, FlowContext, FlowResult, all_images, pagemap_counts

__all__ = ["FLOW", "Classic"]


class Classic(Flow):
    spec = FLOWS["classic"]

    def run(self, run: FlowContext) -> FlowResult:
        if run.rollback_from_images:
            return self._ending_the_source(run)

        def post_dump() -> None:
            run.send_images("images", all_images(run))
            run.release_source_pages()
            run.restore_and_commit(lazy=False, page_server=None)

        run.record_dump(run.criu.dump(run.dump_options(notify=run.notify(post_dump))))
        stats = run.dump_stats()
        assert run.images is not None
        written = stats.pages_written if stats else pagemap_counts(run.images)[0]
        run.custody.dump_returned()
        return FlowResult.counted(image_pages=written, server_pages=0, lazy_pages=0)

    def _ending_the_source(self, run: FlowContext) -> FlowResult:
        """One host (:mod:`..rollback`): the images travel in post-dump, CRIU ends the source as
        the dump returns (it no longer holds its ports, nor its memory), then the destination
        restores and commits. Until then the source's images (pages kept) are the rollback."""

        def post_dump() -> None:
            run.send_images("images", all_images(run))

        run.record_dump(run.criu.dump(run.dump_options(notify=run.notify(post_dump), leave_stopped=False)))
        run.custody.checkpointed()
        run.restore_and_commit(lazy=False, page_server=None)
        run.custody.hand_over()  # already gone: CRIU ended it
        stats = run.dump_stats()
        assert run.images is not None
        written = stats.pages_written if stats else pagemap_counts(run.images)[0]
        return FlowResult.counted(image_pages=written, server_pages=0, lazy_pages=0)


FLOW = Classic
