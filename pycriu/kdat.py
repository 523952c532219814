"""CRIU's kernel-probe cache (``/run/criu.kdat``), kept warm where CRIU cannot keep it itself.

Every CRIU process (each ``criu swrk`` behind libcriu, ``criu restore``, the page server, the
lazy-pages daemon) first probes the kernel ("kerndat": 20 to 30 ms here) unless it can load
``/run/criu.kdat``. CRIU *saves* that file only when ``/run`` is a tmpfs, so that it is gone after
a reboot; where ``/run`` is on a disk (as on this project's development VM), every CRIU process
probes again. In a migration that is paid inside the downtime, by the restore and by the
lazy-pages daemon.

:func:`ensure` gives CRIU its cache back, with the same lifetime: it has CRIU write the file in a
private mount namespace whose ``/run`` is a tmpfs, keeps it in ``/dev/shm/pycriu`` (tmpfs), and
bind-mounts it on ``/run/criu.kdat``. CRIU loads the cache wherever it lies (it checks its magic
numbers and size, not the filesystem). A bind mount does not survive a reboot, and the empty file
left as its mount point is discarded by CRIU as stale, so a new boot probes afresh, exactly as with
CRIU's own cache. The cache is made again when the boot or the CRIU binary changes (a stamp next
to the file says for which it was made). Where ``/run`` is a tmpfs nothing is done: CRIU keeps
its own.

The migration checks (:mod:`pycriu.migration.checks`) call :func:`ensure` on both hosts before
anything is frozen; ``pycriu doctor`` reports :func:`status`. Failing to set it up is never an
error: CRIU then probes as usual.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

from ._fs import filesystem_of

__all__ = ["CACHE", "ensure", "status"]

#: Where CRIU looks for its cache (``KDAT_RUNDIR`` in CRIU's build).
CACHE = Path("/run/criu.kdat")
_KEEP = Path("/dev/shm/pycriu")
#: CRIU's struct kerndat_s starts with two magic numbers; the first is KDAT_MAGIC ("Torzhok").
_KDAT_MAGIC = 0x57023458


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stamp(binary: str) -> dict[str, object]:
    st = os.stat(binary)
    return {"boot": _boot_id(), "binary": os.path.realpath(binary), "ino": st.st_ino, "size": st.st_size,
            "mtime": st.st_mtime_ns}


def _valid(data: bytes) -> bool:
    return len(data) >= 8 and int.from_bytes(data[:4], "little") == _KDAT_MAGIC


def _mounted_on_cache() -> bool:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[4] == str(CACHE) for line in lines)


def status(binary: str | None = None) -> str:
    """``native`` (``/run`` is a tmpfs: CRIU keeps its own cache), ``warm`` (pycriu's cache is in
    place, for ``binary`` if given), or ``cold`` (every CRIU process probes the kernel)."""
    if filesystem_of(CACHE.parent) == "tmpfs":
        return "native"
    try:
        data = CACHE.read_bytes()
        stamp = json.loads((_KEEP / "criu.kdat.json").read_text())
    except (OSError, ValueError):
        return "cold"
    if not _mounted_on_cache() or not _valid(data):
        return "cold"
    if binary is not None and stamp != _stamp(binary):
        return "cold"
    return "warm"


def ensure(binary: str, timeout: float = 10.0) -> str:
    """Make ``/run/criu.kdat`` a valid cache for ``binary`` on this boot (see the module's text);
    returns the resulting :func:`status`. Root only; never raises for a failed set-up."""
    if os.geteuid() != 0:
        return status(binary)
    state = status(binary)
    if state != "cold":
        return state
    try:
        _KEEP.mkdir(mode=0o700, exist_ok=True)
        with open(_KEEP / "kdat.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another agent or migration may be doing the same
            if status(binary) != "cold":
                return status(binary)
            _make(binary, timeout)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return status(binary)


def _make(binary: str, timeout: float) -> None:
    # CRIU writes its cache during any command's kernel probe; in a private mount namespace with a
    # tmpfs on /run it keeps it, and prints it back on stdout
    script = 'mount -t tmpfs -o size=1m,mode=0700 pycriu-kdat /run && "$0" check >/dev/null 2>&1; cat /run/criu.kdat'
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, binary],
                         capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL).stdout
    if not _valid(out):
        return
    tmp = _KEEP / "criu.kdat.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(out)
    os.replace(tmp, _KEEP / "criu.kdat")
    (_KEEP / "criu.kdat.json").write_text(json.dumps(_stamp(binary)))
    while _mounted_on_cache():  # an older cache (another boot's binary): replace it
        subprocess.run(["umount", str(CACHE)], capture_output=True, timeout=timeout, check=True)
    if not CACHE.exists():
        os.close(os.open(CACHE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    subprocess.run(["mount", "--bind", str(_KEEP / "criu.kdat"), str(CACHE)], capture_output=True,
                   timeout=timeout, check=True)
