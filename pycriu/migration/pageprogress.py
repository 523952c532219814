"""Progress of the pages CRIU moves itself (a dump into a page server, a lazy transfer): pycriu
never sees those bytes, so it reads how far CRIU's page connection has got from the kernel
(:func:`~.procs.tcp_bytes_acked`) every half second and reports it as the phase's ``bytes``
progress. Runs only when someone displays progress; a kernel without sock_diag shows none."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .._threads import Worker
from . import procs

__all__ = ["PageProgress"]


class PageProgress:
    """A context manager: while it is open, the bytes acknowledged on CRIU's page connection
    (the local or remote TCP ``port``) are emitted as ``emit(phase, "bytes", done=, total=)``."""

    def __init__(self, emit: Callable[..., None], phase: str, *, enabled: bool, local_port: int | None = None,
                 remote_port: int | None = None, total: int | None = None, every: float = 0.5) -> None:
        self._emit = emit
        self._phase = phase
        self._enabled = enabled
        self._ports: dict[str, Any] = {"local_port": local_port, "remote_port": remote_port}
        self._total = total
        self._every = every
        self._stop = threading.Event()
        self._thread: Worker | None = None
        self._done = 0  # the most seen: a connection CRIU closed no longer counts

    def __enter__(self) -> PageProgress:
        if self._enabled:
            self._thread = Worker(self._run, name=f"pycriu-progress-{self._phase}")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            if not self._sample():
                return  # no sock_diag TCP info here: no figures to show

    def _sample(self) -> bool:
        # the connection is CRIU's own, opened for this transfer: its bytes from zero are the pages
        acked = procs.tcp_bytes_acked(**self._ports)
        if acked is None:
            return False
        self._done = max(self._done, acked)
        total = self._total
        done = min(self._done, total) if total is not None else self._done  # CRIU's messages ride along
        self._emit(self._phase, "bytes", done=done, total=total)
        return True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
