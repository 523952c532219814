"""The files of one agent session: image files received (as data, or by hard link from the
source's own filesystem on one host) within the session's limits, and the files it sends back
(CRIU's logs, the page images its page server received, a pre-dump's pagemaps)."""

from __future__ import annotations

from typing import Any

from .agent_pages import PageServers
from .agent_sandbox import SessionDir
from .errors import ProtocolError
from .protocol import LOG_NAME, PAGE_IMAGE, Channel, Limits, accept_link, check_dir_name, receive_file, send_files

__all__ = ["SessionFiles"]


class SessionFiles:
    """Receives and sends a session's files, every path inside its :class:`SessionDir`."""

    def __init__(self, channel: Channel, sandbox: SessionDir, pages: PageServers, limits: Limits, *,
                 same_host: bool, timeout: float) -> None:
        self.channel = channel
        self.sandbox = sandbox
        self.pages = pages
        self.limits = limits
        self.same_host = same_host
        self.timeout = timeout

    # -- received --------------------------------------------------------------------------------

    def receive(self, msg: dict[str, Any]) -> None:
        """One file as data (``file``)."""
        name = check_dir_name(msg["dir"])
        receive_file(self.channel, msg, self.sandbox.subdir(name), self.limits, timeout=self.timeout)

    def link(self, msg: dict[str, Any]) -> None:
        """One file by hard link (``file-link``), only from a source on this host."""
        if not self.same_host:
            raise ProtocolError("file-link is accepted only by an agent on the source's host (--same-host)")
        accept_link(msg, self.sandbox.subdir(check_dir_name(msg["dir"])), self.limits)

    def batch_done(self, msg: dict[str, Any]) -> None:
        """A batch ended (``files-done``): say what arrived; the session's allowance shrinks by it."""
        count, total = self.limits.received_files, self.limits.received_bytes + self.limits.linked_bytes
        self.channel.send({"type": "files-ok", "count": count, "bytes": total})
        self.limits.received_files = 0  # counters are per batch
        self.limits.received_bytes = 0
        self.limits.max_total_bytes -= total
        self.limits.max_files -= count

    # -- sent ------------------------------------------------------------------------------------

    def logs(self, msg: dict[str, Any]) -> None:
        """CRIU's logs of this session (``logs``)."""
        work = self.sandbox.work
        files = [(p.name, p, None) for p in sorted(work.iterdir())
                 if LOG_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, "images", files, pattern=LOG_NAME)

    def page_images(self, msg: dict[str, Any]) -> None:
        """Hand the source back the page images its dump sent to this session's page server (by
        hard link on this host's filesystem, else as data): on one host, with the source ended
        by its dump, they complete its own images, its rollback until the commit."""
        name = check_dir_name(msg["dir"])
        if not self.pages.received(name):
            raise ProtocolError(f"no page server received pages into {name!r} in this session")
        images = self.sandbox.subpath(name)
        files = [(p.name, p, None) for p in sorted(images.iterdir())
                 if PAGE_IMAGE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files, pattern=PAGE_IMAGE, link=self.same_host)

    def pagemaps(self, msg: dict[str, Any]) -> None:
        """Send the pagemap images of a pre-dump iteration once its page server has written them
        (only the index of the pages: the pages stay here)."""
        name = check_dir_name(msg["dir"])
        # CRIU writes the pagemap when the pre-dump's connection ends
        if not name.startswith("pre-") or not self.pages.received(name, "the pre-dump"):
            raise ProtocolError(f"pagemaps of {name!r}: no pre-dump page server was started for it")
        images = self.sandbox.subpath(name)
        files = [(p.name, p, None) for p in sorted(images.glob("pagemap*.img")) if p.is_file() and not p.is_symlink()]
        send_files(self.channel, name, files)
