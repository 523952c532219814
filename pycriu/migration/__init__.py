"""Live migration of process trees between hosts, through a destination agent.

::

    from pycriu import Migration
    report = Migration(pid, to="ssh://host", mode="lazy").run()
    print(report)

Modules, one job each: :mod:`~pycriu.migration.protocol` (frames, messages, authentication, file
streaming), :mod:`~pycriu.migration.transport` (local / ssh / tcp connections),
:mod:`~pycriu.migration.agent` (the destination's command line; its configuration, sessions and
servers in :mod:`~pycriu.migration.agent_config`, :mod:`~pycriu.migration.agent_session`,
:mod:`~pycriu.migration.agent_server`), :mod:`~pycriu.migration.client` (the
source's requests), :mod:`~pycriu.migration.flows` (the CRIU memory-transfer flows, one module
each), :mod:`~pycriu.migration.custody` (who holds the process: resume, kill or leave stopped),
:mod:`~pycriu.migration.migration` (checks, directories, CRIU options, the end of a run),
:mod:`~pycriu.migration.report`, :mod:`~pycriu.migration.policy` (pre-copy convergence),
:mod:`~pycriu.migration.images` and :mod:`~pycriu.migration.procs` (what is on disk and in /proc),
:mod:`~pycriu.migration.modes` (the flows and which one ``auto`` picks),
:mod:`~pycriu.migration.guard` (the agent's dead-man switch for an uncommitted tree),
:mod:`~pycriu.migration.pagetls` (per-migration TLS for CRIU's page connections),
:mod:`~pycriu.migration.uncork` (CRIU 4.2's 200 ms waits on its corked page-server sockets, worked around),
:mod:`~pycriu.migration.cli` (``pycriu agent`` and ``pycriu migrate``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent_config import AgentConfig
    from .agent_server import serve_stdio, serve_tcp
    from .custody import Outcome
    from .errors import (
        AgentError,
        AuthenticationError,
        MigrationError,
        NoSpaceError,
        PreflightError,
        ProtocolError,
        TransportError,
    )
    from .migration import MODES, Migration
    from .phases import Progress
    from .policy import PreCopyDecision, PreCopyPolicy
    from .protocol import PROTOCOL_VERSION
    from .report import MigrationReport, Phase
    from .transport import Destination, TLSConfig

# Where each public name lives. They are imported on first use (PEP 562), so that the agent,
# which needs none of the source's side, starts without importing it: the local agent's
# start-up is part of every local migration's time.
_EXPORTS = {
    "AgentConfig": "agent_config", "serve_stdio": "agent_server", "serve_tcp": "agent_server", "Outcome": "custody",
    "AgentError": "errors", "AuthenticationError": "errors", "MigrationError": "errors", "PreflightError": "errors",
    "NoSpaceError": "errors",
    "ProtocolError": "errors", "TransportError": "errors",
    "MODES": "migration", "Migration": "migration", "Progress": "phases",
    "PreCopyDecision": "policy", "PreCopyPolicy": "policy", "PROTOCOL_VERSION": "protocol",
    "MigrationReport": "report", "Phase": "report", "Destination": "transport", "TLSConfig": "transport",
}

__all__ = [
    "Migration", "MigrationReport", "Outcome", "Phase", "Progress", "MODES", "PreCopyPolicy", "PreCopyDecision",
    "TLSConfig", "Destination", "MigrationError", "PreflightError", "AgentError", "AuthenticationError",
    "ProtocolError", "NoSpaceError",
    "TransportError", "AgentConfig", "serve_stdio", "serve_tcp", "PROTOCOL_VERSION",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
