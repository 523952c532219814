"""Live migration of process trees between hosts, through a destination agent.

::

    from pycriu import Migration
    report = Migration(pid, to="ssh://host", mode="lazy").run()
    print(report)

Modules, one job each: :mod:`~pycriu.migration.protocol` (frames, messages, authentication, file
streaming), :mod:`~pycriu.migration.transport` (local / ssh / tcp connections),
:mod:`~pycriu.migration.agent` (the destination side), :mod:`~pycriu.migration.client` (the
source's requests), :mod:`~pycriu.migration.flows` (the CRIU memory-transfer flows),
:mod:`~pycriu.migration.migration` (checks, mode choice, rollback, cleanup),
:mod:`~pycriu.migration.report`, :mod:`~pycriu.migration.policy` (pre-copy convergence),
:mod:`~pycriu.migration.images` and :mod:`~pycriu.migration.procs` (what is on disk and in /proc),
:mod:`~pycriu.migration.modes` (the flows and which one ``auto`` picks),
:mod:`~pycriu.migration.guard` (the agent's dead-man switch for an uncommitted tree),
:mod:`~pycriu.migration.pagetls` (per-migration TLS for CRIU's page connections),
:mod:`~pycriu.migration.uncork` (CRIU 4.2's page-server cork stall, worked around),
:mod:`~pycriu.migration.cli` (``pycriu agent`` and ``pycriu migrate``).
"""

from __future__ import annotations

from .agent import AgentConfig, AgentSession, serve_stdio, serve_tcp
from .errors import AgentError, AuthenticationError, MigrationError, ProtocolError, TransportError
from .migration import MODES, Migration, Progress
from .policy import PreCopyDecision, PreCopyPolicy
from .protocol import PROTOCOL_VERSION
from .report import MigrationReport, Phase
from .transport import Destination, TLSConfig

__all__ = [
    "Migration", "MigrationReport", "Phase", "Progress", "MODES", "PreCopyPolicy", "PreCopyDecision",
    "TLSConfig", "Destination", "MigrationError", "AgentError", "AuthenticationError", "ProtocolError",
    "TransportError", "AgentConfig", "AgentSession", "serve_stdio", "serve_tcp", "PROTOCOL_VERSION",
]
