"""The source's side of the agent protocol: one method per request, replies checked."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..options import PageServerAddress
from .errors import AgentError, ProtocolError, TransportError
from .images import read_pagemap
from .protocol import IMAGE_NAME, LOG_NAME, PAGE_IMAGE, PROTOCOL_VERSION, Limits, accept_link, receive_file, send_files
from .transport import Connection

__all__ = ["AgentClient"]


class AgentClient:
    """Requests to one agent session over ``connection`` (which the caller owns)."""

    def __init__(self, connection: Connection, *, timeout: float) -> None:
        self.connection = connection
        self.channel = connection.channel
        self.timeout = timeout
        self.info: dict[str, Any] = {}
        self.rtt = 0.0
        self.commit_sent = False
        self.committed = False
        self.aborted = False
        self._abort_reply: dict[str, Any] | None = None

    def hello(self, local: Mapping[str, Any], mode: str, *, page_tls: bool = False,
              container: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Open the session; with ``page_tls`` the agent answers with a certificate request for
        CRIU's page connections (``tls_csr``); ``container`` (:mod:`.containers`) is checked by
        the agent before anything is frozen."""
        self.channel.send({"type": "hello", "protocol": PROTOCOL_VERSION, "mode": mode, "page_tls": page_tls,
                           **({"container": dict(container)} if container is not None else {}),
                           **{k: local[k] for k in ("pycriu", "criu", "arch", "kernel", "features")}})
        self.info = self.channel.recv("hello", timeout=max(self.timeout, 60.0))
        return self.info

    def page_tls(self, cert_pem: str, ca_pem: str) -> None:
        """Hand the agent its certificate for CRIU's page connections, and this migration's CA."""
        self.channel.send({"type": "page-tls", "cert": cert_pem, "ca": ca_pem})
        self.channel.recv("page-tls-ok")

    def ping(self, rounds: int = 3) -> float:
        """Measure the round-trip time to the agent (the best of ``rounds``)."""
        best = float("inf")
        for _ in range(rounds):
            t0 = time.monotonic()
            self.channel.send({"type": "ping", "t": t0})
            reply = self.channel.recv("pong")
            if reply["t"] != t0:
                raise ProtocolError("pong does not match ping")
            best = min(best, time.monotonic() - t0)
        self.rtt = best
        return best

    def preflight(self, request: dict[str, Any]) -> list[str]:
        """Ask the agent what it cannot provide of what the live tree needs (:mod:`.preflight`)."""
        self.channel.send(request)
        return [str(p) for p in self.channel.recv("preflight-ok")["problems"]]

    def prepare_dir(self, name: str, parent: str | None = None) -> None:
        self.channel.send({"type": "prepare-dir", "dir": name, "parent": parent})
        self.channel.recv("dir-ready")

    def start_page_server(self, name: str, parent: str | None = None, *, tls: bool = False) -> PageServerAddress:
        self.channel.send({"type": "page-server", "dir": name, "parent": parent, "tls": tls})
        reply = self.channel.recv("page-server", timeout=max(self.timeout, 60.0))
        return PageServerAddress(reply["address"], reply["port"])

    def send_images(self, name: str, files: Sequence[tuple[str, str | os.PathLike[str], list[tuple[int, int]] | None]],
                    on_bytes: Callable[[int], None] | None = None,
                    on_file: Callable[[str], None] | None = None, link: bool = False) -> tuple[int, int]:
        return send_files(self.channel, name, files, on_bytes=on_bytes, on_file=on_file, link=link)

    def start_lazy_pages(self, name: str, page_server: PageServerAddress, *, tls: bool = False) -> None:
        """Have the agent start its lazy-pages daemon over ``name`` now (no reply: the agent
        reports a failure to the restore). ``inventory.img`` and ``pstree.img`` must be there."""
        self.channel.send({"type": "lazy-pages", "dir": name, "tls": tls,
                           "page_server": {"address": page_server.address, "port": page_server.port}})

    def restore(self, name: str, *, lazy: bool, page_server: PageServerAddress | None,
                flags: Mapping[str, bool], tls: bool = False) -> dict[str, Any]:
        self.channel.send({"type": "restore", "dir": name, "lazy": lazy, "flags": dict(flags), "tls": tls,
                           "page_server": None if page_server is None else
                           {"address": page_server.address, "port": page_server.port}})
        return self.channel.recv("restored", timeout=self.timeout)

    def commit(self) -> dict[str, Any]:
        """Hand the process over: the agent resumes its restored tree and acknowledges.

        ``commit_sent`` becomes True once the message may have reached the agent: after the send
        returned, or when something other than a broken connection interrupted it (the frame may
        then be complete). A send that failed on the connection delivered no whole frame. A
        connection the agent has already closed (it exited or was killed) is not sent to at all:
        the write would still succeed, and the source would have to stay stopped, not knowing."""
        if self.channel.peer_gone():
            raise TransportError("the agent closed the connection before the commit (it exited or was killed)")
        try:
            self.channel.send({"type": "commit"})
        except (TransportError, ProtocolError):  # not sent, or not as a whole frame
            raise
        except BaseException:
            self.commit_sent = True
            raise
        self.commit_sent = True
        try:
            reply = self.channel.recv("committed")
        except AgentError as exc:
            if exc.code != "internal":
                # refused (tree already killed, or not allowed now): the agent did not resume its
                # copy and kills it as the session ends, so the source may resume its own
                self.commit_sent = False
            raise
        self.committed = True
        return reply

    def abort(self, reason: str) -> dict[str, Any] | None:
        """Tell the agent to drop this migration (best effort: None if it cannot be told).
        Only the first call talks to the agent."""
        if self.aborted:
            return self._abort_reply
        self.aborted = True
        try:
            self.channel.send({"type": "abort", "reason": reason[:1000]})
            self._abort_reply = self.channel.recv("aborted", timeout=15.0)
            return self._abort_reply
        except Exception:  # noqa: BLE001 - the agent also aborts on its own when the link drops
            return None

    def lazy_wait(self, timeout: float) -> dict[str, Any]:
        self.channel.send({"type": "lazy-wait", "timeout": timeout})
        return self.channel.recv("lazy-done", timeout=timeout + 30.0)

    def fetch_logs(self, into: Path) -> list[Path]:
        """Receive the agent's CRIU logs into ``into``; returns their paths here."""
        into.mkdir(parents=True, exist_ok=True)
        self.channel.send({"type": "logs"})
        limits = Limits(max_file_size=256 << 20, max_total_bytes=1 << 30, max_files=64, min_free_bytes=0)
        return self._receive_files(into, LOG_NAME, limits, replace=True)

    def fetch_page_images(self, name: str, into: Path, *, link: bool) -> tuple[list[Path], int, int]:
        """Receive back the page images the dump sent to the agent's page server for ``name``
        into ``into`` (which must not have them yet); ``link``: the agent is on this host and
        may hand them by hard link. Returns (the files, bytes linked, bytes copied)."""
        self.channel.send({"type": "page-images", "dir": name})
        limits = Limits(max_files=100_000, min_free_bytes=0)
        got = self._receive_files(into, PAGE_IMAGE, limits, link=link)
        return got, limits.linked_bytes, limits.received_bytes

    def fetch_pagemaps(self, name: str, into: Path) -> list[Path]:
        """Receive the pagemaps the page server of pre-dump ``name`` wrote, into ``into`` (the
        source's directory of that pre-dump), with an empty ``pages-N.img`` beside each: a dump
        whose parent this is reads only the pagemaps, to tell which pages the parent has."""
        self.channel.send({"type": "pagemaps", "dir": name})
        limits = Limits(max_file_size=64 << 20, max_total_bytes=256 << 20, max_files=4096, min_free_bytes=0)
        got = self._receive_files(into, IMAGE_NAME, limits)
        for path in got:
            pages = into / read_pagemap(path).pages_name
            if not pages.exists():
                pages.touch()
        return got

    def _receive_files(self, into: Path, pattern: re.Pattern[str], limits: Limits, *, replace: bool = False,
                       link: bool = False) -> list[Path]:
        """Take ``file`` (and with ``link``, ``file-link``) messages into ``into`` until
        ``files-done``, and confirm them; ``replace``: a file of that name here is replaced."""
        got: list[Path] = []
        fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                msg = self.channel.recv("file", "file-link", "files-done")
                if msg["type"] == "files-done":
                    self.channel.send({"type": "files-ok", "count": len(got),
                                       "bytes": limits.received_bytes + limits.linked_bytes})
                    return got
                if replace and pattern.fullmatch(msg["name"]):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(msg["name"], dir_fd=fd)
                if msg["type"] == "file-link":
                    if not link:
                        raise ProtocolError("the agent offered a file by hard link, but it is not on this host")
                    accept_link(msg, fd, limits, pattern=pattern)
                else:
                    receive_file(self.channel, msg, fd, limits, pattern=pattern)
                got.append(into / msg["name"])
        finally:
            os.close(fd)

    def bye(self) -> dict[str, Any]:
        self.channel.send({"type": "bye"})
        return self.channel.recv("bye")
