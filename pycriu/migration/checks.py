"""The pre-freeze checks of one host's CRIU: version, ``criu check`` and the features a flow needs.

Both sides run :func:`probe` before anything is frozen. The version is asked from CRIU once per
:class:`~pycriu.Criu` object (one cheap libcriu request; a migration makes its own object unless
given one, the agent one per session), and stays known to that object, so that the operations
that follow (a restore in the downtime) do not ask again. The slow part, a full ``criu check`` and CRIU's feature check
(each a ``criu swrk`` that probes the kernel, 20 to 50 ms), runs concurrently, and a *successful*
result is kept:

* in this process, and
* for the rest of the boot in ``/run/pycriu/criu-check.json`` (root only, mode 0600), so that a
  short-lived agent (``local``, ``ssh://``) does not pay for it on every migration.

The result is reused only while everything it depends on is unchanged: the boot
(``/proc/sys/kernel/random/boot_id``), the kernel release, the CRIU binary (path, device, inode,
size, modification time) and the version CRIU reports now. This is the same bargain as CRIU's own
kernel-probe cache (``/run/criu.kdat``), which CRIU keeps only when ``/run`` is a tmpfs, and which
:func:`probe` sets up where CRIU cannot (:mod:`pycriu.kdat`). A failed check is never cached.
Delete the file (or call :func:`forget`) to probe again.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import kdat
from .._threads import spawn
from ..criu import Criu, CriuVersion

__all__ = ["HostCheck", "probe", "forget", "older_destination", "CACHE_FILE"]

CACHE_FILE = Path("/run/pycriu/criu-check.json")
_MEMO: dict[tuple[Any, ...], HostCheck] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class HostCheck:
    """What one host's CRIU can do. ``cached``: the check and features came from a cache."""

    criu: str
    lazy_pages: bool
    mem_track: bool
    cached: bool = False
    seconds: float = 0.0


def _key(criu: Criu, version: str) -> tuple[Any, ...]:
    st = os.stat(criu.binary)
    return (kdat.boot_id(), platform.release(), os.path.realpath(criu.binary), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, version)


def _read_cache(key: tuple[Any, ...]) -> HostCheck | None:
    try:
        fd = os.open(CACHE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size > 65536:
            return None  # not written by us: ignore it
        data = json.loads(os.read(fd, 65536))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(list(key))):
        return None
    f = data.get("features")
    if not isinstance(f, dict) or not all(isinstance(f.get(k), bool) for k in ("lazy_pages", "mem_track")):
        return None
    return HostCheck(key[-1], f["lazy_pages"], f["mem_track"], cached=True)


def _write_cache(key: tuple[Any, ...], check: HostCheck) -> None:
    try:
        CACHE_FILE.parent.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(CACHE_FILE.parent)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not os.path.isdir(CACHE_FILE.parent) \
                or os.path.islink(CACHE_FILE.parent):
            return
        tmp = CACHE_FILE.with_name(f".{CACHE_FILE.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": list(key), "features": {"lazy_pages": check.lazy_pages,
                                                       "mem_track": check.mem_track}}, f)
        os.replace(tmp, CACHE_FILE)
    except OSError:
        pass  # a cache only


def forget() -> None:
    """Drop the cached results (this process's and the boot's file): the next probe runs CRIU."""
    with _LOCK:
        _MEMO.clear()
    try:
        CACHE_FILE.unlink()
    except OSError:
        pass


def probe(criu: Criu) -> HostCheck:
    """Check that CRIU works here and what it supports; raises the :class:`~pycriu.CriuError` of
    the failing check (version too old, ``criu check`` failed, feature check failed)."""
    t0 = time.monotonic()
    # Criu asks the version once per object before its first operation: asking it here through
    # the same path leaves it known, so a restore in the downtime does not ask again
    version = str(criu.supported_version())  # CriuVersionError when too old
    kdat.ensure(criu.binary)  # CRIU's kernel-probe cache, for the CRIU processes in the downtime
    key = _key(criu, version)
    with _LOCK:
        known = _MEMO.get(key)
    if known is None:
        known = _read_cache(key)
    if known is not None:
        with _LOCK:
            _MEMO[key] = known
        return HostCheck(version, known.lazy_pages, known.mem_track, cached=True, seconds=time.monotonic() - t0)
    # ``criu check`` and the feature check are two CRIU processes: run them side by side
    full_check = spawn(Criu(criu.binary).check, name="pycriu-criu-check")
    try:
        features = criu.features(refresh=True)
    finally:
        wait([full_check])
    full_check.result()
    result = HostCheck(version, features.lazy_pages, features.mem_track, seconds=time.monotonic() - t0)
    with _LOCK:
        _MEMO[key] = result
    _write_cache(key, result)
    return result


def older_destination(source: str, destination: str) -> str | None:
    """Why a destination with CRIU ``destination`` cannot take images from a source with CRIU
    ``source`` (versions as the hosts exchange them), or ``None``. CRIU reads images of its own
    and older versions; a newer CRIU's images may use what an older one does not know."""
    try:
        older = CriuVersion.parse(destination) < CriuVersion.parse(source)
    except ValueError as exc:
        return f"cannot compare the hosts' CRIU versions: {exc}"
    return f"destination CRIU {destination} is older than the source's {source}" if older else None
