"""The source's image transfer: its images streamed (or hard-linked on one host) to the agent
with progress in bytes, the images the destination's lazy-pages daemon reads first, and the
page images dropped from the source once the destination holds them. Written against
:class:`~.runstate.RunState`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..options import PageServerAddress
from .images import DirUsage
from .runstate import RunState

__all__ = ["lazy_daemon_reads", "send_images", "release_source_pages"]


def lazy_daemon_reads(name: str) -> bool:
    """Whether ``criu lazy-pages`` reads image ``name`` when it starts (CRIU's
    prepare_dummy_pstree: the inventory, the process tree and every task's ``ids-PID.img``);
    the others only once the restore hands it the tasks. The agent starts the daemon while the
    other images still arrive, so these must all be complete first: a daemon that opened an
    ``ids`` image still being received failed with "Unexpected EOF (criu/image.c:887)"."""
    return name in ("inventory.img", "pstree.img") or (name.startswith("ids-") and name.endswith(".img"))


def send_images(run: RunState, name: str, files: Sequence[tuple[str, Path, list[tuple[int, int]] | None]],
                detail: str = "", lazy_daemon: PageServerAddress | None = None) -> int:
    """Stream ``files`` to the agent's directory ``name``. With ``lazy_daemon`` (the address the
    destination's lazy-pages daemon reads pages from), the images that daemon needs go first
    and the agent starts it while the others follow."""
    assert run.client is not None
    total = sum(sum(n for _, n in r) if r is not None else p.stat().st_size for _, p, r in files)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        run.check_cancelled()
        done += n
        run.emit("image transfer", "bytes", done=done, total=total)

    client = run.client
    waiting = {f[0] for f in files if lazy_daemon_reads(f[0])} if lazy_daemon is not None else set()
    if lazy_daemon is not None:
        files = sorted(files, key=lambda f: (not lazy_daemon_reads(f[0]), f[0]))

    def on_file(sent: str) -> None:
        run.check_cancelled()  # after every file: a hard-linked one moves no bytes
        if waiting:
            waiting.discard(sent)
            if not waiting and lazy_daemon is not None:
                client.start_lazy_pages(name, lazy_daemon, tls=bool(run.criu_tls_options()))

    link = run.link_images
    with run.phase("image transfer", (detail or f"{len(files)} files, {total} bytes")
                    + (" (whole files by hard link)" if link else "")):
        run.client.send_images(name, files, on_bytes=on_bytes, on_file=on_file, link=link)
    return total

def release_source_pages(run: RunState) -> None:
    """Remove the source's page images once the destination holds a copy: the rollback is the
    stopped source itself, not its images, and the memory their page cache held then serves
    the restore. On one host with ``same_host_rollback="stopped-source"`` (an agent that
    copied rather than linked them), this is the
    difference between the restore reusing warm memory and faulting in memory the hypervisor
    took back (free page reporting): measured here for 1 GiB, CRIU's restore took 0.7-1.1 s
    instead of 3.0-3.3 s. (Hard-linked images stay the agent's: then this frees nothing.)
    The report still counts them, as written by the source."""
    assert run.images is not None
    for p in run.images.glob("pages-*.img"):
        st = p.lstat()
        p.unlink()
        run.released += DirUsage(min(st.st_size, st.st_blocks * 512), page_images_apparent=st.st_size)
