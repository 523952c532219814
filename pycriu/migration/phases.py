"""The run's clock: phases with their start and length (into the report), and the progress
events a caller's display receives. A progress callback that raises never breaks a migration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .report import MigrationReport, Phase

__all__ = ["RateMeter", "PhaseClock", "Progress"]


@dataclass(frozen=True)
class Progress:
    """One progress event: a phase starts or ends, or bytes moved within it."""

    phase: str
    event: str  # start | end | bytes | info
    elapsed: float
    seconds: float | None = None
    done: int | None = None
    total: int | None = None
    message: str = ""


class RateMeter:
    """Bytes per second over the last ``window`` seconds of a transfer, and the time left."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._samples: list[tuple[float, int]] = []

    def update(self, elapsed: float, done: int, total: int | None = None) -> tuple[float | None, float | None]:
        """Record ``done`` bytes at ``elapsed`` s; return (bytes/s, seconds left), each ``None``
        until two samples a moment apart exist (or, for the time left, without a total)."""
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # a new transfer in the same phase
        self._samples.append((elapsed, done))
        while len(self._samples) > 2 and elapsed - self._samples[1][0] >= self.window:
            self._samples.pop(0)
        t0, d0 = self._samples[0]
        if elapsed - t0 <= 0:
            return None, None
        rate = (done - d0) / (elapsed - t0)
        left = (total - done) / rate if total is not None and rate > 0 else None
        return rate, left


class PhaseClock:
    """Phases of one run, timed from ``t0``; phases may overlap (each thread its own)."""

    def __init__(self, report: MigrationReport, progress: Callable[[Progress], object] | None) -> None:
        self.t0 = time.monotonic()
        self._report = report
        self._progress = progress
        self._open: dict[str, float] = {}
        self._lock = threading.Lock()

    def emit(self, phase: str, event: str, **kw: Any) -> None:
        if self._progress is not None:
            try:
                self._progress(Progress(phase, event, time.monotonic() - self.t0, **kw))
            except Exception:  # noqa: BLE001 - a progress display must not break a migration
                pass

    def start(self, name: str) -> None:
        with self._lock:
            self._open[name] = time.monotonic()
        self.emit(name, "start")

    def end(self, name: str, detail: str = "") -> float:
        """End phase ``name`` (one that is not open is ignored: 0.0) and return its length."""
        with self._lock:
            start = self._open.pop(name, None)
        if start is None:
            return 0.0
        seconds = time.monotonic() - start
        self._report.phases.append(Phase(name, round(seconds, 6), detail, start=round(start - self.t0, 6)))
        self.emit(name, "end", seconds=seconds, message=detail)
        return seconds

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """A phase around a block; one that raises ends with "(failed)" in its detail."""
        self.start(name)
        try:
            yield
        except BaseException:
            self.end(name, (detail + " " if detail else "") + "(failed)")
            raise
        self.end(name, detail)
