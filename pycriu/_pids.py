"""A restore that finds one of its PIDs taken ("Can't fork for PID: File exists", or for a
thread "Unable to create a thread: -17"): who holds it, and trying again when nobody visible
does.

CRIU restores a tree under its dumped PIDs. Right after a dump on the same host (a restore
that takes the tree back, a rollback, zdtm's own tests), the PID may still be taken for a
moment with no task, zombie, process group or session in ``/proc`` showing it: seen with
zdtm's maps06 (84 MB of mappings), where 4 of 20 CLI restores and 10 of 20 bare
``Criu.restore`` calls failed so at the first attempt and every second attempt, 100 ms
later, succeeded; and for a thread with zdtm's socket_aio (glibc's POSIX AIO threads), in 1
of 6 trials, the rollback's restore of the same images failing too. CRIU's fork fails before
the tree runs, and CRIU kills whatever it had restored, so the restore can run again. A PID
that a visible process holds is not waited for: that is a real conflict (the dumped tree still
runs, a zombie nobody reaps). Standard library only."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["pid_clash", "holders", "retry_pid_clash"]

T = TypeVar("T")

_CLASH = re.compile(r"Can't fork for (\d+): File exists")
#: CRIU's restorer, when clone3 could not give a thread its dumped TID (-EEXIST); it names no TID
_THREAD_CLASH = re.compile(r"Unable to create a thread: -17\b")


def pid_clash(message: str | None) -> int | None:
    """The PID a failed restore found taken (CRIU's "Can't fork for PID: File exists"); 0 when
    it was a thread's TID, which CRIU does not name ("Unable to create a thread: -17"); None
    when the restore failed for another reason."""
    text = message or ""
    m = _CLASH.search(text)
    if m:
        return int(m.group(1))
    return 0 if _THREAD_CLASH.search(text) else None


def holders(pid: int) -> list[str]:
    """What visibly keeps ``pid`` taken, as phrases: the process (or zombie) with that PID, and
    the processes whose group or session it is. Empty when ``/proc`` shows nothing."""
    found = []
    stat = _stat(Path(f"/proc/{pid}/stat"))
    if stat is not None:
        comm, state, ppid = stat[0], stat[1], stat[2]
        what = "a zombie" if state == "Z" else "a process"
        found.append(f"pid {pid} is {what} ({comm!r}, state {state}, parent {ppid})")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        s = _stat(entry / "stat")
        if s is not None and pid in (int(s[3]), int(s[4])):
            role = "session" if int(s[4]) == pid else "process group"
            found.append(f"pid {entry.name} ({s[0]!r}) is in the {role} {pid}")
    return found


def _stat(path: Path) -> list[str] | None:
    """comm, state, ppid, pgrp, session from a ``/proc/PID/stat`` (None: gone)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    comm, _, rest = text[text.index("(") + 1:].rpartition(")")
    fields = rest.split()
    return [comm, *fields[:4]] if len(fields) >= 4 else None


def retry_pid_clash(restore: Callable[[], T], *, attempts: int = 10, delay: float = 0.1,
                    log: logging.Logger | None = None) -> T:
    """``restore()``, tried again (up to ``attempts`` times, ``delay`` apart) while it fails
    because one of the tree's PIDs is taken and nothing in ``/proc`` holds it (a thread's TID,
    which CRIU does not name, is tried again as such). Any other failure, or the last one, is
    raised."""
    for i in range(attempts):
        try:
            return restore()
        except Exception as exc:  # a CriuError; this module does not import pycriu's errors
            clash = pid_clash(getattr(exc, "criu_message", None) or str(exc))
            if i == attempts - 1 or clash is None or (clash and holders(clash)):
                raise
            if log is not None:
                log.info("restore found %s taken by nothing visible (attempt %d of %d); trying again",
                         f"pid {clash}" if clash else "a thread's id", i + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")
