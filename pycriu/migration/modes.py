"""The migration modes: what each flow needs from the two hosts and where its images live (one
:class:`FlowSpec` per flow, the one description that ``auto``, the agent, ``pycriu doctor`` and
the flow itself read), and which one ``auto`` picks.

Both sides use this: the source to choose and load the flow, the agent to know from the
``hello`` where the session's images belong (the source names the mode it was asked for, before
it knows the destination). Loading this module loads no flow: the agent's start-up is in every
local migration's time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KernelUnsupportedError

if TYPE_CHECKING:
    from .flows.base import Flow

__all__ = ["FlowSpec", "FLOWS", "MODES", "NEEDS_LAZY", "NEEDS_MEM_TRACK", "NO_MEM_TRACK", "choose_mode", "DirtyAdvice",
           "advise"]


@dataclass(frozen=True)
class FlowSpec:
    """What a flow needs and where its images live; :meth:`load` gives the flow itself."""

    name: str
    #: the module in :mod:`pycriu.migration.flows` that implements it (its ``FLOW`` class)
    module: str
    #: needs CRIU's lazy pages (userfaultfd) on both hosts
    needs_lazy_pages: bool = False
    #: needs dirty-memory tracking (soft-dirty) on both hosts
    needs_mem_track: bool = False
    #: the source's images hold only CRIU's few non-lazy pages: kept in a memory filesystem
    source_images_in_memory: bool = False
    #: the same for the destination's images
    destination_images_in_memory: bool = False
    #: on one host the dump can end the source, a failure restoring it from its own images
    #: (:mod:`.rollback`): also a tree holding host-wide names (ports, bound sockets, FIFOs) moves
    same_host_names: bool = False
    #: when it cannot (it serves pages from the frozen source's memory), the flow that does the
    #: same job from the source's images and runs instead
    same_host_names_instead: str | None = None

    def load(self) -> Flow:
        flow: Flow = importlib.import_module(f"{__package__}.flows.{self.module}").FLOW()
        return flow


#: Every flow, in the order ``auto`` would consider them. A new flow: a module in flows/, a line here.
FLOWS: dict[str, FlowSpec] = {spec.name: spec for spec in (
    FlowSpec("classic", "classic", same_host_names=True),
    FlowSpec("page-server", "page_server", same_host_names=True),
    FlowSpec("lazy", "lazy", needs_lazy_pages=True, source_images_in_memory=True, destination_images_in_memory=True,
             same_host_names_instead="page-server-on-source"),
    FlowSpec("page-server-on-source", "page_server_on_source", needs_lazy_pages=True,
             destination_images_in_memory=True, same_host_names=True),
    FlowSpec("pre-copy", "pre_copy", needs_mem_track=True),
    FlowSpec("hybrid", "hybrid", needs_lazy_pages=True, needs_mem_track=True, source_images_in_memory=True),
)}

MODES = tuple(FLOWS)
NEEDS_LAZY = frozenset(name for name, flow in FLOWS.items() if flow.needs_lazy_pages)
NEEDS_MEM_TRACK = frozenset(name for name, flow in FLOWS.items() if flow.needs_mem_track)
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
        if both_track:
            return "pre-copy", (f"auto: lazy pages are not supported on the {side}, but both hosts track dirty "
                                "memory: pre-copy moves the memory while the tree runs, so the frozen dump sends "
                                "only what changed since (into the destination's page server: the source "
                                "writes no page)")
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


@dataclass(frozen=True)
class DirtyAdvice:
    """Which flow fits a workload that rewrites ``dirty_rate`` bytes/s of its ``memory`` bytes
    over a link of ``bandwidth`` bytes/s (what :func:`advise` reasons from, and its answer)."""

    dirty_rate: float
    memory: int
    bandwidth: float
    #: the flows that fit, best first
    modes: tuple[str, ...]
    #: seconds a stop-and-copy flow (classic, page-server) keeps the tree frozen to move its memory
    stop_and_copy_downtime: float
    #: whether pre-copy's rounds shrink (each round sends what the last one's time let it dirty)
    precopy_converges: bool
    reason: str


#: Pre-copy converges when the workload dirties memory slower than this share of the link: each
#: round then sends at most this share of the one before.
_CONVERGE_SHARE = 0.5
#: A stop-and-copy flow is good enough when it freezes the tree for less than this (seconds).
_SHORT_FREEZE = 0.5


def advise(dirty_rate: float, memory: int, bandwidth: float = 125e6) -> DirtyAdvice:
    """The flows that fit a workload, from how fast it rewrites memory (measured between two
    checkpoints: :func:`pycriu.images.diff.diff`), how much memory it has and the link's speed
    (default 1 Gbit/s). Every flow works; this orders them by the downtime each would cause."""
    if dirty_rate < 0 or memory < 0 or bandwidth <= 0:
        raise ValueError("dirty_rate and memory must not be negative, bandwidth must be positive")
    freeze = memory / bandwidth
    converges = dirty_rate < _CONVERGE_SHARE * bandwidth
    mib = 1 << 20
    figures = (f"it rewrote {dirty_rate / mib:.1f} MiB/s of {memory / mib:.0f} MiB; at {bandwidth / mib:.0f} MiB/s "
               f"a stop-and-copy flow keeps it frozen about {freeze:.2f} s")
    if freeze < _SHORT_FREEZE and dirty_rate < 0.05 * bandwidth:
        modes: tuple[str, ...] = ("page-server", "lazy", "pre-copy", "classic")
        why = "little memory and few writes: the page server moves it all in the freeze, and nothing runs remote"
    elif not converges:
        modes = ("lazy", "page-server", "classic")
        why = ("it writes faster than pre-copy's rounds can send, so they would not shrink: lazy (post-copy) "
               "freezes it only for the non-memory state and fetches pages on demand")
    else:
        modes = ("lazy", "hybrid", "pre-copy", "page-server", "classic")
        why = ("lazy keeps the freeze shortest whatever the size; pre-copy (or hybrid) converges at this rate, "
               "so its final freeze sends only what the last round dirtied")
    return DirtyAdvice(dirty_rate, memory, bandwidth, modes, freeze, converges, f"{figures}; {why}")
