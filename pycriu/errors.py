"""The exception hierarchy of pycriu.

Every failure of CRIU reaches Python as a :class:`CriuError` subclass that carries what a person
needs to act on it: the operation, the errno, CRIU's own first error line (read from its log, since
libcriu never returns it), the log path, and a hint for the common causes. Bad input is refused
before CRIU runs with an :class:`InvalidOptionError` (also a :class:`ValueError`).

All exceptions pickle, so they cross process boundaries (the migration agent) intact.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CriuError",
    "CriuNotFoundError",
    "CriuVersionError",
    "KernelUnsupportedError",
    "CriuPermissionError",
    "NoSuchProcessError",
    "PidInUseError",
    "InvalidOptionError",
    "ServiceError",
    "CheckError",
    "DumpError",
    "PreDumpError",
    "RestoreError",
    "PageServerError",
    "LazyPagesError",
    "ContainerRuntimeError",
    "first_error_line",
    "first_error_in_text",
    "stderr_message",
    "hint_for",
]


class CriuError(Exception):
    """Base of every error raised by pycriu.

    Attributes:
        operation: what was being done ("dump", "restore", "page-server", ...).
        errno: the errno CRIU or libcriu reported, or ``None``.
        criu_message: CRIU's first ``Error (...)`` line from the log, or ``None``.
        log_path: the CRIU log of this operation, when one was written.
        hint: what usually fixes this, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        errno: int | None = None,
        criu_message: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.errno = errno
        self.criu_message = criu_message
        self.log_path = str(log_path) if log_path is not None else None
        self.hint = hint if hint is not None else hint_for(self)

    def __str__(self) -> str:
        text = self.message
        if self.errno:
            text += f" [errno {self.errno}: {_errno.errorcode.get(self.errno, '?')}]"
        for label, value in (("criu", self.criu_message), ("log", self.log_path), ("hint", self.hint)):
            if value:
                text += f"\n  {label}: {value}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.operation, self.errno, self.criu_message, self.log_path, self.hint),
        )


def _rebuild(cls: type[CriuError], message: str, operation: str | None, errno: int | None,
             criu_message: str | None, log_path: str | None, hint: str | None) -> CriuError:
    return cls(message, operation=operation, errno=errno, criu_message=criu_message,
               log_path=log_path, hint=hint)


class CriuNotFoundError(CriuError, FileNotFoundError):
    """The ``criu`` binary (or libcriu) is missing or not executable."""


class CriuVersionError(CriuError):
    """CRIU is older than pycriu or the requested feature needs."""


class KernelUnsupportedError(CriuError):
    """The running kernel lacks a feature (for example dirty-memory tracking for pre-dump)."""


class CriuPermissionError(CriuError, PermissionError):
    """Checkpoint/restore needs root (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE, ...)."""


class NoSuchProcessError(CriuError, ProcessLookupError):
    """The pid to dump does not exist."""


class InvalidOptionError(CriuError, ValueError):
    """An option value was refused before CRIU ran; the message names the option and the fix."""


class ServiceError(CriuError):
    """libcriu could not talk to its ``criu swrk`` child (connection refused, broken RPC)."""


class CheckError(CriuError):
    """``criu check`` found that checkpoint/restore cannot work on this kernel."""


class DumpError(CriuError):
    """Dump failed; the dumped tree was resumed by CRIU."""


class PreDumpError(DumpError):
    """Pre-dump failed."""


class RestoreError(CriuError):
    """Restore failed."""


class PidInUseError(RestoreError):
    """Restore needs a pid that is taken ("Can't fork for N: File exists", or a thread's:
    "Unable to create a thread: -17"). The hint names what holds it when ``/proc`` shows that
    (the dumped tree still running, a zombie nobody reaped, a process group or session of that
    number)."""


class PageServerError(CriuError):
    """CRIU's page server failed to start or to serve."""


class LazyPagesError(CriuError):
    """CRIU's lazy-pages daemon failed to start or to serve."""


class ContainerRuntimeError(CriuError):
    """The container runtime's own command (``runc state``, ``runc restore``, ...) failed, or it
    has no such container; the message carries the runtime's error line."""


for _cls in [CriuError, *[globals()[_n] for _n in __all__ if _n.endswith("Error") and _n != "CriuError"]]:
    _cls.__module__ = "pycriu"


# "Error (file:line): msg", optionally behind a timestamp "(00.123456)" (verbose logs) and a
# "pie: 1: " or "1: " task prefix (messages from the parasite or restorer code).
_ERROR_LINE = re.compile(
    r"^(?:\(\s*[0-9.]+\)\s*)?(?:pie:\s*)?(?:\d+:\s*)?Error \((?P<where>[^)]*)\):\s*(?P<msg>.*)$")
_NOISE = ("rlimit: Can't setup RLIMIT_NOFILE",)


def first_error_line(log_path: str | os.PathLike[str] | None) -> str | None:
    """Return CRIU's first meaningful ``Error (file:line): message`` from a log, or ``None``.

    Known harmless errors (RLIMIT_NOFILE without CAP_SYS_RESOURCE) are skipped.
    """
    if log_path is None:
        return None
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    return first_error_in_text(text)


def first_error_in_text(text: str) -> str | None:
    """The first meaningful ``Error (file:line): message`` line of CRIU output, as
    ``message (file:line)``; ``None`` when there is none."""
    for line in text.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and not any(n in m.group("msg") for n in _NOISE):
            return f"{m.group('msg').strip()} ({m.group('where')})"
    return None


def stderr_message(stderr: IO[bytes]) -> str | None:
    """What a finished ``criu`` process said on stderr (a file it wrote): its first CRIU error
    line, else its last printable line; ``None`` if it said nothing. CRIU reports there what fails
    before its log is open."""
    text = os.pread(stderr.fileno(), 1 << 16, 0).decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.isprintable()]
    return first_error_in_text(text) or (lines[-1] if lines else None)


# (pattern in CRIU's message, hint) for the common causes, first match wins.
#: How to get a CRIU that works, for a user who installed pycriu with pip as much as from a checkout.
INSTALL_CRIU = ("install CRIU >= 4.2 (your distribution's criu package where it is that new, or a release built "
                "from criu.org; in a pycriu checkout, scripts/provision.sh builds one) and put it on PATH or in "
                "$PYCRIU_CRIU")

_HINTS: list[tuple[str, str]] = [
    ("Can't fork for", "a restored pid is in use: restore into a fresh PID namespace "
     "(run the workload under `unshare --pid --fork`), or wait until the dumped tree is reaped"),
    ("Unable to create a thread: -17", "a restored thread's id is in use: restore into a fresh PID namespace "
     "(run the workload under `unshare --pid --fork`), or wait until the dumped tree is reaped"),
    ("Tracking memory is not available", "the kernel has no soft-dirty tracking "
     "(CONFIG_MEM_SOFT_DIRTY); use a flow without pre-dump"),
    ("Dirty tracking is OFF", "the kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY)"),
    ("vDSO", f"this CRIU is too old for the kernel: {INSTALL_CRIU}"),
    ("Connected TCP socket", "the tree has established TCP connections: set tcp_established=True "
     "(and keep the network locked), or tcp_close=True"),
    ("has bad size", "a file the tree holds open changed size after the dump: keep it unchanged "
     "until restore, or point stdio at /dev/null or a pipe"),
    ("splice", "raise fs.pipe-max-size to 4194304 (CRIU's lazy page server needs 4 MiB pipes)"),
    ("session leader", "the tree's session leader is outside it: dump the session leader, or start "
     "the workload with setsid / shell_job=True"),
    ("External", "the tree uses a resource outside it: declare it with external=[...] / "
     "inherit_fds, or ext_unix_sk / shell_job"),
    ("userfaultfd", "lazy pages need userfaultfd: check /dev/userfaultfd and vm.unprivileged_userfaultfd"),
]


def hint_for(err: CriuError) -> str | None:
    """The hint for the common causes of ``err`` (from its CRIU message and errno), or ``None``."""
    msg = err.criu_message or ""
    for pattern, hint in _HINTS:
        if pattern in msg:
            return hint
    if err.errno in (_errno.EPERM, _errno.EACCES) and isinstance(err, CriuPermissionError):
        return "run as root: checkpoint/restore needs CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE"
    if err.errno == _errno.ECONNREFUSED:
        return "libcriu could not start `criu swrk`: check the criu binary path (pycriu doctor)"
    return None
