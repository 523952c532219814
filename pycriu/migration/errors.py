"""Errors of a migration.

A failed :meth:`pycriu.Migration.run` raises :class:`MigrationError` (or a subclass); its
``report`` attribute is the :class:`~pycriu.MigrationReport` of what happened, including where the
process runs now (``report.source_state``, ``report.destination_state``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CriuError

if TYPE_CHECKING:
    from .report import MigrationReport

__all__ = ["MigrationError", "PreflightError", "ProtocolError", "AuthenticationError", "AgentError", "TransportError"]


class MigrationError(CriuError):
    """A migration failed; ``report`` says what happened to the process on both sides."""

    def __init__(self, message: str, *, report: MigrationReport | None = None, **kwargs: Any) -> None:
        super().__init__(message, operation=kwargs.pop("operation", "migrate"), **kwargs)
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        # Everything but the report (a live object of this process) crosses a pickle.
        state = {"operation": self.operation, "errno": self.errno, "criu_message": self.criu_message,
                 "log_path": self.log_path, "hint": self.hint, "code": getattr(self, "code", None)}
        return (_rebuild, (type(self), self.message, state))


class PreflightError(MigrationError):
    """Found before anything was frozen: this migration cannot work as asked. ``resources``
    names what is in the way (a port, a socket path, a FIFO, ...); the message says the fix."""

    def __init__(self, message: str, *, resources: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.resources = resources


def _rebuild(cls: type[MigrationError], message: str, state: dict[str, Any]) -> MigrationError:
    code = state.pop("code", None)
    err = cls(message, **({"code": code} if code is not None else {}), **state)
    return err


class TransportError(MigrationError):
    """The agent could not be reached, or the connection to it broke or timed out."""


class ProtocolError(MigrationError):
    """A peer sent something the protocol does not allow (bad frame, type, field, name or size)."""


class AuthenticationError(ProtocolError):
    """The peer could not be authenticated (wrong shared secret, no authentication offered)."""


class AgentError(MigrationError):
    """The agent refused a request or reported a failure; ``code`` is its error code."""

    def __init__(self, message: str, *, code: str = "failed", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.code = code


class NoSpaceError(AgentError):
    """A file did not fit where it was to be written (the destination's disk or memory
    filesystem, or the source's when files come back); the message names the directory, the
    bytes needed and the bytes free."""

    def __init__(self, message: str, *, code: str = "no-space", **kwargs: Any) -> None:
        super().__init__(message, code=code, **kwargs)


for _cls in (MigrationError, TransportError, ProtocolError, AuthenticationError, AgentError, NoSpaceError):
    _cls.__module__ = "pycriu"
