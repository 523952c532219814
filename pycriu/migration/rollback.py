"""On one host, what a failure after the freeze brings the source back from.

Between two hosts the rollback is always the frozen source: it stays stopped, its memory held,
until the destination runs, and a failure resumes it. On one host that has two costs:

* a tree that holds host-wide names (a listening port, a Unix socket bound to a path, a FIFO,
  a file lock, its PIDs in the destination's namespace) keeps holding them while the
  destination restores the same names, which CRIU cannot do ("Address already in use");
* the restore needs fresh memory for a second copy of the tree while the first is held. On a
  host short of memory the kernel reclaims, swaps or kills; on a VM that hands free memory back
  to its hypervisor (virtio-balloon free page reporting) fresh memory is slow to fault in. The
  CLI's ``criu dump`` ends the tree, and its restore reuses the memory just freed, still warm:
  measured here, a 1 GiB classic migration froze the tree for 5.3 s with a stopped source, 0.9 s
  with its images as the rollback (docs/benchmarks.rst).

The other rollback ends the source at the dump, as the CLI does, and keeps its complete images on
this host until the destination runs; a failure restores the source from them (if even that
fails, the images stay, and the error says so). It holds no name and no memory twice; it relies
on a restore of those images, which the stopped source does not.

``Migration(same_host_rollback=...)``: ``"auto"`` (the default) takes the images in every flow
that can end the source at its dump (classic, page-server, page-server-on-source) and the
stopped source in those that serve pages from it (lazy, pre-copy, hybrid), unless the tree holds
host-wide names (then lazy runs as page-server-on-source, and pre-copy and hybrid are refused);
``"stopped-source"`` keeps the stopped source (a rollback that needs no restore; refused for a
tree holding names); ``"images"`` takes the images (lazy then runs as page-server-on-source; pre-copy and
hybrid are refused). A container that holds no host-wide name keeps its stopped source: its
runtime, not the source's rollback, sets up the root and mounts its images need (one holding
names can only take the images, whose restore without its runtime may fail: the images are
then kept). :func:`choose` decides before anything is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PreflightError
from .modes import FLOWS

__all__ = ["SAME_HOST_ROLLBACKS", "Rollback", "choose"]

#: the values of ``Migration(same_host_rollback=...)``
SAME_HOST_ROLLBACKS = ("auto", "stopped-source", "images")
STOPPED_SOURCE = "the stopped source"
IMAGES = "the source's images"


@dataclass(frozen=True)
class Rollback:
    """The decision: the flow that runs (``mode``, perhaps another than asked), whether the dump
    ends the source (its images are then the rollback), why, and the report's note."""

    mode: str
    from_images: bool
    mode_reason: str
    note: str

    @property
    def plan(self) -> str:
        return IMAGES if self.from_images else STOPPED_SOURCE


def choose(option: str, requested: str, mode: str, mode_reason: str, names: list[str], *,
           container: bool = False, links: bool = True, remaps: bool = False) -> Rollback:
    """The rollback of a migration to this host. ``option``: ``same_host_rollback``;
    ``requested``/``mode``/``mode_reason``: the flow asked for and the one chosen so far;
    ``names``: the host-wide names the tree holds; ``container``: the tree is a container, whose
    images its runtime restores (its root, mounts and cgroups), not the source's rollback: its
    stopped source is its rollback; ``links``: the agent's images are on the source's filesystem
    (page-server's pages come back into the source's images by hard link; else as a copy, inside
    the freeze, which ``auto`` does not make); ``remaps``: the dump may link-remap files the tree
    holds open but deleted (``link_remap``): a restore that worked removes those links, so after
    a destination that restored and then failed, the images could no longer bring the files
    back; ``auto`` keeps the stopped source, which still holds them. Raises
    :class:`PreflightError` (nothing is frozen yet) when the names or the option need a rollback
    that the flow cannot give."""
    if option not in SAME_HOST_ROLLBACKS:
        raise ValueError(f"same_host_rollback={option!r}")
    if container and not names:
        if option == "images":
            raise PreflightError(
                "same_host_rollback='images' cannot be the rollback of a container: its images are restored "
                "with the container's root and mounts (by its runtime), which the source's rollback does not set up",
                hint="use same_host_rollback='auto' or 'stopped-source' (the container is kept frozen until the "
                     "destination runs)")
        return Rollback(mode, False, mode_reason, "")
    if names:
        held = ", ".join(names)
        if option == "stopped-source":
            raise PreflightError(
                f"same_host_rollback='stopped-source' keeps the source holding {held} while the destination "
                "restores it on this host, which CRIU cannot do (\"Address already in use\")",
                resources=tuple(names),
                hint="use same_host_rollback='auto' or 'images' (the dump ends the source and a failure restores "
                     "it from its own images), or migrate to another host or network namespace")
        return _from_images(requested, mode, mode_reason, f"the tree holds {held}",
                            f"the source keeps holding {held}", names)
    if option == "images":
        return _from_images(requested, mode, mode_reason, "same_host_rollback='images'",
                            "same_host_rollback='images' asks the dump to end the source", [])
    if option == "auto" and remaps and FLOWS[mode].same_host_names:
        return Rollback(mode, False, mode_reason,
                        "one host, with link_remap: the dump may keep deleted files the tree holds open as links "
                        "that the destination's restore removes, so the images could not bring them back after "
                        "a later failure; the stopped source, which still holds them, is the rollback")
    if option == "auto" and mode == "page-server" and not links:
        return Rollback(mode, False, mode_reason,
                        "one host, but the agent's images are on another filesystem than the source's: ending the "
                        "source at the dump would copy every page back inside the freeze; the stopped source is "
                        "the rollback")
    if option == "auto" and FLOWS[mode].same_host_names:
        return Rollback(mode, True, mode_reason,
                        "one host: the dump ends the source, as criu dump does, so that the restore reuses its "
                        "memory instead of taking a second copy's; its images are kept until the destination "
                        "runs, and a failure restores it from them (same_host_rollback='stopped-source' keeps "
                        "it stopped instead)")
    return Rollback(mode, False, mode_reason, "")


def _from_images(requested: str, mode: str, mode_reason: str, why: str, keeps: str, names: list[str]) -> Rollback:
    spec = FLOWS[mode]
    note = (f"one host, and {why}: the dump ends the source; its images are kept until the destination runs, "
            "and a failure restores it from them")
    if spec.same_host_names:
        return Rollback(mode, True, mode_reason, note)
    instead = spec.same_host_names_instead
    if instead is None and requested == "auto":
        # auto chose pre-copy (no lazy pages on a side): page-server is the flow left that can
        return Rollback("page-server", True,
                        f"auto on one host ({why}): {mode} would keep the frozen source as its rollback, and "
                        "without lazy pages page-server is the flow that can end it at the dump", note)
    if instead is None:
        able = [name for name, flow in FLOWS.items() if flow.same_host_names]
        raise PreflightError(
            f"on one host the {mode} flow cannot end the source at its dump ({why}): it keeps the source "
            f"frozen as its rollback, and {keeps} while the destination restores",
            resources=tuple(names),
            hint=f"use mode={able[0]!r} or one of {', '.join(able[1:])} (the dump ends the source and a "
                 "failure restores it from its own images), or migrate to another host or network namespace")
    reason = (f"{requested} on one host ({why}): {mode} would keep the frozen source as its rollback, serving its "
              f"pages; {instead} restores lazily too, its pages served from the source's images")
    return Rollback(instead, True, reason, note)
