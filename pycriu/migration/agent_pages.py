"""CRIU's page connections on the agent: the page servers a session starts (one per images
directory: the dump's, each pre-dump iteration's), and the policy for the source's own page
server that this root daemon's CRIU is asked to connect to."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..criu import Criu
from ..daemons import PageServer
from ..errors import CriuError
from ..options import PageServerOptions
from .errors import AgentError, ProtocolError

__all__ = ["PageServers", "check_source_address"]


class PageServers:
    """The session's page servers by directory name; each receives one dump or pre-dump."""

    def __init__(self, address: str) -> None:
        self.address = address  # where the source's CRIU connects
        self._servers: dict[str, PageServer] = {}

    def start(self, criu: Criu, name: str, images: Path, work: Path, tls: dict[str, Any]) -> int:
        """Start the page server for ``name`` and return its port."""
        if name in self._servers:
            raise ProtocolError(f"a page server for {name!r} was already started")
        ps = criu.page_server(PageServerOptions(images_dir=images, work_dir=work, address=self.address, port=0,
                                                log_file=f"page-server-{name}.log", **tls))
        try:
            ps.start()
        except CriuError as exc:
            raise AgentError(f"page server failed to start: {exc.message} ({exc.criu_message})",
                             code="page-server-failed") from None
        self._servers[name] = ps
        return ps.port

    def received(self, name: str, what: str = "the dump", *, keep: bool = True) -> bool:
        """Wait until the page server of ``name`` has received ``what`` and exited; False when
        none was started for it. With ``keep=False`` it is forgotten (and stopped on failure)."""
        ps = self._servers.get(name) if keep else self._servers.pop(name, None)
        if ps is None:
            return False
        try:
            ps.wait(timeout=60)
        except (CriuError, TimeoutError) as exc:
            if not keep:
                ps.stop()
            raise AgentError(f"the page server did not receive {what} ({name}): {exc}",
                             code="page-server-failed") from None
        return True

    def __contains__(self, name: str) -> bool:
        return name in self._servers

    def stop(self) -> None:
        """Stop every page server still running."""
        for ps in self._servers.values():
            ps.stop(grace=1.0)
        self._servers.clear()


def check_source_address(address: str, peer: str | None, allowed: Iterable[str]) -> None:
    """The source's page server must be on the source: the peer's own address (any loopback
    address for a peer on this host), or one the agent was told to accept. Otherwise a peer
    could make this root daemon connect anywhere."""
    accepted = set(allowed)
    if peer is not None:
        accepted.add(peer)
    try:
        loopback = ipaddress.ip_address(address).is_loopback
        peer_loopback = peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        loopback = peer_loopback = False
    if address not in accepted and not (loopback and peer_loopback):
        raise ProtocolError(f"the source's page server address {address!r} is not the source ({peer}); "
                            f"start the agent with --page-server-from {address} to accept it")
