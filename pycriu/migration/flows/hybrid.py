"""hybrid: pre-copy, then a lazy final dump: what is still dirty follows after the resume.
Needs soft-dirty tracking and lazy pages."""

from __future__ import annotations

from ..modes import FLOWS
from .base import Flow, FlowContext, FlowResult
from .lazy import lazy_dump
from .pre_copy import pre_copied_pages, pre_copy_iterations

__all__ = ["FLOW", "Hybrid"]


class Hybrid(Flow):
    spec = FLOWS["hybrid"]

    def run(self, run: FlowContext) -> FlowResult:
        assert run.client is not None and run.scratch is not None
        parent = pre_copy_iterations(run, local_pagemaps=True)
        run.client.prepare_dir("images", parent=parent)
        # The lazy dump writes its pagemaps here (in memory, not beside the scratch directory):
        # its parent is the scratch copy of the last iteration, with the pagemaps that say which
        # pages the destination already holds; only the others are left to fault in.
        result = lazy_dump(run, track_mem=True, parent_images=str(run.scratch / parent))
        result.add_pre_copied(pre_copied_pages(run))
        return result


FLOW = Hybrid
