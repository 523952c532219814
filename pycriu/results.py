"""Results of CRIU operations, and CRIU's own statistics read from its ``stats-*`` images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DumpStats", "RestoreStats", "DumpResult", "RestoreResult", "Features", "read_stats"]



@dataclass(frozen=True)
class DumpStats:
    """CRIU's dump statistics (``stats-dump``); times in seconds, converted from CRIU's µs."""

    freezing_time: float
    frozen_time: float
    memdump_time: float
    memwrite_time: float
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int

    def to_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class RestoreStats:
    """CRIU's restore statistics (``stats-restore``); times in seconds."""

    forking_time: float
    restore_time: float
    pages_compared: int
    pages_skipped_cow: int
    pages_restored: int

    def to_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class DumpResult:
    """What a dump produced: where the images and the log are, and CRIU's statistics."""

    images_dir: Path
    log_path: Path
    stats: DumpStats | None = None


@dataclass(frozen=True)
class RestoreResult:
    """The restored tree's root pid (in the caller's PID namespace) and CRIU's statistics."""

    pid: int
    log_path: Path
    stats: RestoreStats | None = None
    #: how many times CRIU's restore ran: more than 1 when a PID of the tree was taken for a
    #: moment by nothing visible, right after its dump on this host (see :meth:`Criu.restore`)
    attempts: int = 1


@dataclass(frozen=True)
class Features:
    """Optional CRIU features this kernel and CRIU support (``criu_feature_check``)."""

    mem_track: bool
    lazy_pages: bool
    pidfd_store: bool
    extra: dict[str, bool] = field(default_factory=dict)


def read_stats(path: str | Path) -> DumpStats | RestoreStats | None:
    """Parse a CRIU ``stats-dump`` or ``stats-restore`` image; ``None`` if absent or unreadable."""
    from .images import ImageError, read_messages  # protobuf loads on the first dump, not at import

    try:
        entry: Any = next(iter(read_messages(path, "STATS")), None)  # a message made at run time
    except (OSError, ImageError):
        return None
    if entry is None:
        return None
    if entry.HasField("dump"):
        d = entry.dump
        return DumpStats(
            freezing_time=d.freezing_time / 1e6, frozen_time=d.frozen_time / 1e6,
            memdump_time=d.memdump_time / 1e6, memwrite_time=d.memwrite_time / 1e6,
            pages_scanned=d.pages_scanned, pages_skipped_parent=d.pages_skipped_parent,
            pages_written=d.pages_written, pages_lazy=d.pages_lazy,
        )
    if entry.HasField("restore"):
        r = entry.restore
        return RestoreStats(
            pages_compared=r.pages_compared, pages_skipped_cow=r.pages_skipped_cow,
            forking_time=r.forking_time / 1e6, restore_time=r.restore_time / 1e6,
            pages_restored=r.pages_restored,
        )
    return None
