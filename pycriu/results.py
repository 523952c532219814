"""Results of CRIU operations, and CRIU's own statistics read from its ``stats-*`` images."""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._protobuf import fields

__all__ = ["DumpStats", "RestoreStats", "DumpResult", "RestoreResult", "Features", "read_stats"]

_IMG_SERVICE_MAGIC = 0x55105940
_STATS_MAGIC = 0x57093306


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


@dataclass(frozen=True)
class Features:
    """Optional CRIU features this kernel and CRIU support (``criu_feature_check``)."""

    mem_track: bool
    lazy_pages: bool
    pidfd_store: bool
    extra: dict[str, bool] = field(default_factory=dict)


def read_stats(path: str | Path) -> DumpStats | RestoreStats | None:
    """Parse a CRIU ``stats-dump`` or ``stats-restore`` image; ``None`` if absent or unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 12:
        return None
    magic0, magic1, size = struct.unpack_from("<III", data)
    if magic0 != _IMG_SERVICE_MAGIC or magic1 != _STATS_MAGIC:
        return None
    try:
        entry = fields(data[12:12 + size])
        if 1 in entry:
            d = fields(entry[1])
            return DumpStats(
                freezing_time=d.get(1, 0) / 1e6, frozen_time=d.get(2, 0) / 1e6,
                memdump_time=d.get(3, 0) / 1e6, memwrite_time=d.get(4, 0) / 1e6,
                pages_scanned=d.get(5, 0), pages_skipped_parent=d.get(6, 0),
                pages_written=d.get(7, 0), pages_lazy=d.get(9, 0),
            )
        if 2 in entry:
            r = fields(entry[2])
            return RestoreStats(
                pages_compared=r.get(1, 0), pages_skipped_cow=r.get(2, 0),
                forking_time=r.get(3, 0) / 1e6, restore_time=r.get(4, 0) / 1e6,
                pages_restored=r.get(5, 0),
            )
    except ValueError:
        return None
    return None
