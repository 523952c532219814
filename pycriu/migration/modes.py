"""The migration modes, what each needs from the two hosts, and which one ``auto`` picks.

Both sides use this: the source to choose the flow, the agent to know it from the ``hello``
(where the source names the mode it was asked for, before it knows the destination).
"""

from __future__ import annotations

from ..errors import KernelUnsupportedError

__all__ = ["MODES", "NEEDS_LAZY", "NEEDS_MEM_TRACK", "NO_MEM_TRACK", "choose_mode"]

#: Every flow, in the order ``auto`` would consider them.
MODES = ("classic", "page-server", "lazy", "page-server-on-source", "pre-copy", "hybrid")
NEEDS_LAZY = frozenset({"lazy", "page-server-on-source", "hybrid"})
NEEDS_MEM_TRACK = frozenset({"pre-copy", "hybrid"})
NO_MEM_TRACK = "kernel has no dirty-memory tracking (CONFIG_MEM_SOFT_DIRTY not set): pre-dump unavailable"


def choose_mode(requested: str, src_lazy: bool, src_track: bool, dst_lazy: bool, dst_track: bool) -> tuple[str, str]:
    """The flow to run and why; raises :class:`KernelUnsupportedError` when it cannot run."""
    both_lazy = src_lazy and dst_lazy
    both_track = src_track and dst_track
    if requested == "auto":
        if both_lazy:
            return "lazy", ("auto: both hosts support lazy pages (userfaultfd), so post-copy gives the shortest "
                            "downtime and writes no page of anonymous memory to any disk")
        side = "source" if not src_lazy else "destination"
        return "page-server", (f"auto: lazy pages are not supported on the {side}; the page server on the "
                               "destination receives the pages during the dump, so the source writes none")
    if requested in NEEDS_MEM_TRACK and not both_track:
        side = "source" if not src_track else "destination"
        raise KernelUnsupportedError(f"{requested} migration needs dirty-memory tracking on the {side}: "
                                     f"{NO_MEM_TRACK}", operation="migrate",
                                     hint="use mode='lazy', 'page-server' or 'classic'")
    if requested in NEEDS_LAZY and not both_lazy:
        side = "source" if not src_lazy else "destination"
        raise KernelUnsupportedError(f"{requested} migration needs lazy pages (userfaultfd) on the {side}",
                                     operation="migrate", hint="use mode='page-server' or 'classic'")
    return requested, "requested"
