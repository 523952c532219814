"""What the stages of one run share, as the protocols they are written against: the caller's
:class:`Arguments` (a :class:`~pycriu.migration.migration.Migration`) and the run's
:class:`RunState` (a :class:`~pycriu.migration.migration.MigrationRun`). The handshake
(:mod:`.handshake`), the image transfer (:mod:`.transfer`), the handover (:mod:`.handover`)
and the end (:mod:`.teardown`) use only these, so that they depend on what
they read, not on the module that runs them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..containers.options import ContainerOptions
    from ..criu import Criu
    from . import pagetls
    from .client import AgentClient
    from .custody import Custody
    from .images import DirUsage
    from .report import MigrationReport
    from .transport import Connection, Destination, TLSConfig

__all__ = ["Arguments", "RunState"]


class Arguments(Protocol):
    """The validated arguments of a migration."""

    pid: int
    mode: str
    destination: Destination
    secret: bytes | None
    tls: TLSConfig | None
    insecure_plaintext: bool
    criu_tls: bool
    ssh_options: tuple[str, ...]
    identity_file: str | None
    agent_command: tuple[str, ...] | None
    log_dir: Path | None
    keep_logs: bool | None
    timeout: float
    lazy_timeout: float
    source_address: str | None
    container: ContainerOptions | None
    container_hello: dict[str, Any] | None
    flags: dict[str, bool]
    same_host_rollback: str
    scratch_dir: Path | None


class RunState(Protocol):
    """One run's state, as the handshake and the end read and set it."""

    @property
    def m(self) -> Arguments: ...

    pid: int
    criu: Criu
    report: MigrationReport
    custody: Custody
    conn: Connection | None
    client: AgentClient | None
    local: dict[str, Any]
    source_address: str
    #: (st_dev, st_ino) of files in the source's images that came by hard link: written elsewhere
    linked_in: set[tuple[int, int]]
    scratch: Path | None
    images: Path | None
    log_dir: Path | None
    src_logs: Path | None
    tls_dir: Path | None
    page_tls: pagetls.PageTLS | None
    authority: Future[pagetls.Authority] | None
    cleanups: list[Callable[[], object]]
    page_bytes: int
    released: DirUsage
    link_images: bool
    t0: float
    t_freeze: float | None
    t_resume: float | None

    def note(self, text: str) -> None: ...

    def emit(self, phase: str, event: str, **kw: Any) -> None: ...

    def phase(self, name: str, detail: str = "") -> AbstractContextManager[None]: ...

    def check_cancelled(self) -> None: ...

    def criu_tls_options(self) -> dict[str, Any]: ...
