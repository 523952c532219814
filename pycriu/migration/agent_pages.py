"""CRIU's page connections on the agent: the page servers a session starts (one per images
directory: the dump's, each pre-dump iteration's), and the policy for the source's own page
server that this root daemon's CRIU is asked to connect to."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..criu import Criu
from ..daemons import PageServer
from ..errors import CriuError, InvalidOptionError
from ..options import PageServerAddress, PageServerOptions
from .errors import AgentError, ProtocolError

if TYPE_CHECKING:
    from .pagetls import PageTLS
    from .transport import TLSConfig

__all__ = ["PageServers", "check_source_address"]


class PageServers:
    """The session's page connections: its page servers by directory name (each receives one
    dump or pre-dump), the TLS they and the lazy-pages daemon use, and which page server of the
    source the lazy-pages daemon may be sent to."""

    def __init__(self, address: str, *, peer: str | None, allowed_sources: Iterable[str],
                 agent_tls: TLSConfig | None) -> None:
        self.address = address  # where the source's CRIU connects
        self._peer = peer
        self._allowed_sources = tuple(allowed_sources)
        self._agent_tls = agent_tls
        #: this session's own certificate for CRIU's page connections, once the source issued it
        self.page_tls: PageTLS | None = None
        self._servers: dict[str, PageServer] = {}

    def tls_options(self, requested: bool) -> dict[str, Any]:
        """CRIU's own TLS options for a page connection: none unless the source asked; then the
        session's certificate, else the agent's own."""
        if not requested:
            return {}
        if self.page_tls is not None:
            return self.page_tls.criu_options()
        if self._agent_tls is None:
            raise AgentError("TLS for CRIU's page connections was requested but this agent has no certificate",
                             code="unsupported")
        return self._agent_tls.criu_options()

    def source_server(self, ps: dict[str, Any]) -> PageServerAddress:
        """The source's page server named by a message, once :func:`check_source_address` allows it."""
        check_source_address(ps["address"], self._peer, self._allowed_sources)
        try:
            return PageServerAddress(ps["address"], ps["port"])
        except InvalidOptionError as exc:
            raise ProtocolError(f"the source's page server: {exc.message}") from None

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

    def received(self, name: str, what: str = "the dump") -> bool:
        """Wait until the page server of ``name`` has received ``what`` and exited; False when
        none was started for it. It stays known: its pages may be asked for again."""
        ps = self._servers.get(name)
        if ps is None:
            return False
        self._wait(ps, name, what)
        return True

    def take(self, name: str) -> bool:
        """:meth:`received` for the restore, which reads the pages: the server is forgotten, and
        stopped if it failed. False when none was started for ``name``."""
        ps = self._servers.pop(name, None)
        if ps is None:
            return False
        try:
            self._wait(ps, name, "the dump")
        except AgentError:
            ps.stop()
            raise
        return True

    @staticmethod
    def _wait(ps: PageServer, name: str, what: str) -> None:
        try:
            ps.wait(timeout=60)
        except (CriuError, TimeoutError) as exc:
            raise AgentError(f"the page server did not receive {what} ({name}): {exc}",
                             code="page-server-failed") from None

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
