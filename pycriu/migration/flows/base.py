"""What every flow is: a description of what it needs (read by ``auto``, the agent and the
doctor) and a source half that runs against a :class:`FlowContext`.

A flow never writes the report's outcome and never decides the source's fate: it reports events
to the run's :class:`~pycriu.migration.custody.Custody` and returns a :class:`FlowResult`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..images import PAGE_SIZE, list_images, pagemaps

if TYPE_CHECKING:  # the agent reads the flows' descriptions: it must not load the source's side
    from ...criu import Criu
    from ...options import DumpOptions, PageServerAddress
    from ...results import DumpResult, DumpStats
    from ..client import AgentClient
    from ..custody import Custody
    from ..policy import PreCopyPolicy
    from ..report import MigrationReport

__all__ = ["Flow", "FlowContext", "FlowResult", "ImageFile"]

#: An image to send: (name, path, byte ranges to send or None for the whole file).
ImageFile = tuple[str, Path, list[tuple[int, int]] | None]


@dataclass
class FlowResult:
    """What a flow moved: page counts and the bytes that went through CRIU's page connections."""

    pages: dict[str, int] = field(default_factory=dict)
    page_bytes: int = 0

    @classmethod
    def counted(cls, *, image_pages: int, server_pages: int, lazy_pages: int) -> FlowResult:
        return cls({"total": image_pages + server_pages + lazy_pages, "in_image_files": image_pages,
                    "via_page_server": server_pages, "lazy": lazy_pages}, (server_pages + lazy_pages) * PAGE_SIZE)

    def add_pre_copied(self, pages: int) -> None:
        self.pages["pre_copied"] = pages
        self.page_bytes += pages * PAGE_SIZE


class FlowContext(Protocol):
    """What a flow uses of the run (:class:`~pycriu.migration.migration.MigrationRun`)."""

    pid: int
    criu: Criu
    client: AgentClient | None
    custody: Custody
    report: MigrationReport
    images: Path | None
    scratch: Path | None
    src_logs: Path | None
    source_address: str
    #: (st_dev, st_ino) of files in the source's images that came by hard link: written elsewhere
    linked_in: set[tuple[int, int]]
    cancel: threading.Event
    cleanups: list[Callable[[], object]]

    @property
    def rollback_from_images(self) -> bool: ...
    @property
    def timeout(self) -> float: ...
    @property
    def lazy_timeout(self) -> float: ...
    @property
    def policy(self) -> PreCopyPolicy: ...
    @property
    def flags(self) -> dict[str, bool]: ...
    @property
    def progress_wanted(self) -> bool: ...

    def emit(self, phase: str, event: str, **kw: Any) -> None: ...

    def note(self, text: str) -> None: ...
    def phase(self, name: str, detail: str = "") -> AbstractContextManager[None]: ...
    def phase_start(self, name: str) -> None: ...
    def phase_end(self, name: str, detail: str = "") -> float: ...
    def relay(self, address: PageServerAddress) -> PageServerAddress: ...
    def criu_tls_options(self) -> dict[str, Any]: ...
    def dump_options(self, **kw: Any) -> DumpOptions: ...
    def notify(self, post_dump: Callable[[], None] | None) -> Callable[[str, int], bool]: ...
    def record_dump(self, result: DumpResult, label: str = "dump", *, stats: bool = True) -> None: ...
    def dump_stats(self) -> DumpStats | None: ...
    def send_images(self, name: str, files: Sequence[ImageFile], detail: str = "",
                    lazy_daemon: PageServerAddress | None = None) -> int: ...
    def release_source_pages(self) -> None: ...
    def restore_and_commit(self, *, lazy: bool, page_server: PageServerAddress | None,
                           name: str = "images") -> None: ...


class Flow:
    """One memory-transfer flow: :meth:`run`, and as ``spec`` its
    :class:`~pycriu.migration.modes.FlowSpec` (set by each flow from ``modes.FLOWS``)."""

    def run(self, run: FlowContext) -> FlowResult:
        raise NotImplementedError


def all_images(run: FlowContext) -> list[ImageFile]:
    assert run.images is not None
    return [(i.name, i.path, None) for i in list_images(run.images)]


def pagemap_counts(images: Path) -> tuple[int, int, int]:
    """(present, lazy-only, lazy-and-present) pages in the pagemaps of ``images``."""
    present = lazy_only = both = 0
    for pm in pagemaps(images):
        for e in pm.entries:
            if e.present and e.lazy:
                both += e.nr_pages
            elif e.present:
                present += e.nr_pages
            elif e.lazy:
                lazy_only += e.nr_pages
    return present, lazy_only, both


