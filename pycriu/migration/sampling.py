"""How fast a tree rewrites its memory, measured before a migration: two dumps that leave it
running, some seconds apart, compared page by page (:func:`pycriu.images.diff.diff`).

This needs no kernel dirty tracking (this machine's kernel has none), so it works wherever a
dump works. It costs two short freezes and, for the time of the sample, two copies of the tree's
memory in a private directory (on ``/dev/shm`` when there is room), removed afterwards. The
rate feeds :func:`pycriu.migration.modes.advise`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..containers.options import ContainerOptions
from ..criu import Criu
from ..images.diff import CheckpointDiff, diff
from ..images.memory import Memory
from ..options import DumpOptions
from .images import memory_dir
from .modes import DirtyAdvice, advise

__all__ = ["DirtySample", "sample_dirty_rate"]


@dataclass(frozen=True)
class DirtySample:
    """What a sample measured, and the flows it advises."""

    seconds: float
    #: bytes of memory the second dump held
    memory: int
    diff: CheckpointDiff
    advice: DirtyAdvice

    def to_dict(self) -> dict[str, Any]:
        d = self.diff
        return {"seconds": self.seconds, "memory": self.memory, "rewritten_bytes": d.rewritten_bytes,
                "dirty_rate": d.dirty_rate, "changed_pages": d.total("changed"), "new_pages": d.total("new"),
                "modes": list(self.advice.modes), "reason": self.advice.reason,
                "precopy_converges": self.advice.precopy_converges}

    def __str__(self) -> str:
        return f"dirty-memory sample over {self.seconds:.1f} s: {', '.join(self.advice.modes)} ({self.advice.reason})"


def sample_dirty_rate(pid: int, seconds: float = 2.0, *, criu: Criu | None = None,
                      flags: dict[str, Any] | None = None, container: ContainerOptions | None = None,
                      bandwidth: float = 125e6, scratch: str | Path | None = None) -> DirtySample:
    """Dump the tree rooted at ``pid`` twice, ``seconds`` apart, leaving it running, and
    compare. ``flags`` are the migration's CRIU flags (``tcp_established``...), ``container``
    its container options: the dumps are the ones the migration would make, but for leaving
    the tree running. ``bandwidth``: the link's bytes/s, for the advice."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds}: a sample needs a positive interval")
    criu = criu or Criu()
    base = Path(scratch) if scratch is not None else memory_dir()
    work = Path(tempfile.mkdtemp(prefix="pycriu-dirty-", dir=base))
    try:
        def dump(name: str) -> Path:
            d = work / name
            d.mkdir()
            kw: dict[str, Any] = {**(flags or {}), "images_dir": d, "log_file": "dump.log", "leave_running": True}
            opts = container.dump_options(pid=pid, **kw) if container is not None else DumpOptions(pid=pid, **kw)
            criu.dump(opts)
            return d

        a = dump("a")
        time.sleep(seconds)
        b = dump("b")
        with Memory(a) as ma, Memory(b) as mb:
            result = diff(ma, mb)
            memory = mb.held_bytes()
        rate = result.dirty_rate if result.dirty_rate is not None else result.rewritten_bytes / seconds
        return DirtySample(seconds, memory, result, advise(rate, memory, bandwidth))
    finally:
        shutil.rmtree(work, ignore_errors=True)
