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
error: CRIU then probes as usual. An operator turns it off with ``PYCRIU_KDAT=off`` in the
environment of pycriu (the source's process and the agent): :func:`ensure` then does nothing; and
removes it with ``pycriu doctor --undo-kdat`` (:func:`remove`): the bind mount, the empty mount
point and the kept copy go, and CRIU probes as before pycriu came.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

from ._fs import filesystem_of, mounts

__all__ = ["CACHE", "ensure", "status", "remove", "enabled", "boot_id"]

#: Where CRIU looks for its cache (``KDAT_RUNDIR`` in CRIU's build).
CACHE = Path("/run/criu.kdat")
_KEEP = Path("/dev/shm/pycriu")
#: CRIU's struct kerndat_s starts with two magic numbers; the first is KDAT_MAGIC ("Torzhok").
_KDAT_MAGIC = 0x57023458


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``): caches of kernel probes are per boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stamp(binary: str) -> dict[str, object]:
    st = os.stat(binary)
    return {"boot": boot_id(), "binary": os.path.realpath(binary), "ino": st.st_ino, "size": st.st_size,
            "mtime": st.st_mtime_ns}


def _valid(data: bytes) -> bool:
    return len(data) >= 8 and int.from_bytes(data[:4], "little") == _KDAT_MAGIC


def _mounted_on_cache() -> bool:
    return any(mount == str(CACHE) for mount, _ in mounts())


def _keep_fd(create: bool) -> int | None:
    """A descriptor of ``/dev/shm/pycriu`` if it is ours: a real directory (no link), owned by
    root, closed to everyone else. ``/dev/shm`` is world-writable: anyone may have made that name
    first, and a root process writing through it would write wherever they pointed it."""
    if create:
        try:
            os.mkdir(_KEEP, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        fd = os.open(_KEEP, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def _read(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read(65536)


def _write(dir_fd: int, name: str, data: bytes) -> None:
    """Replace ``name`` in ``dir_fd`` atomically (a new file, renamed over the old one)."""
    tmp = f".{name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def status(binary: str | None = None) -> str:
    """``native`` (``/run`` is a tmpfs: CRIU keeps its own cache), ``warm`` (pycriu's cache is in
    place, for ``binary`` if given), or ``cold`` (every CRIU process probes the kernel)."""
    if filesystem_of(CACHE.parent) == "tmpfs":
        return "native"
    keep = _keep_fd(create=False)
    if keep is None:
        return "cold"
    try:
        data = CACHE.read_bytes()
        stamp = json.loads(_read(keep, "criu.kdat.json"))
    except (OSError, ValueError):
        return "cold"
    finally:
        os.close(keep)
    if not _mounted_on_cache() or not _valid(data):
        return "cold"
    if binary is not None and stamp != _stamp(binary):
        return "cold"
    return "warm"


def enabled() -> bool:
    """Whether :func:`ensure` may set the cache up (not with ``PYCRIU_KDAT=off``, ``0`` or ``no``)."""
    return os.environ.get("PYCRIU_KDAT", "on").strip().lower() not in ("off", "0", "no", "false")


def ensure(binary: str, timeout: float = 10.0) -> str:
    """Make ``/run/criu.kdat`` a valid cache for ``binary`` on this boot (see the module's text);
    returns the resulting :func:`status`. Root only, and not with ``PYCRIU_KDAT=off``; never
    raises for a failed set-up."""
    if os.geteuid() != 0 or not enabled():
        return status(binary)
    state = status(binary)
    if state != "cold":
        return state
    keep = _keep_fd(create=True)
    if keep is None:  # someone else's /dev/shm/pycriu: leave it (and CRIU without its cache)
        return state
    try:
        lock = os.open("kdat.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=keep)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another agent or migration may be doing the same
            if status(binary) == "cold":
                _make(binary, keep, timeout)
        finally:
            os.close(lock)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    finally:
        os.close(keep)
    return status(binary)


def remove(timeout: float = 10.0) -> list[str]:
    """Undo :func:`ensure`: unmount pycriu's cache from ``/run/criu.kdat``, remove the empty
    file left as its mount point and the copy in ``/dev/shm/pycriu``. Returns what was done
    (empty: there was nothing of pycriu's). CRIU's own cache (``/run`` a tmpfs) is left alone."""
    done: list[str] = []
    while _mounted_on_cache():
        subprocess.run(["umount", str(CACHE)], capture_output=True, timeout=timeout, check=True)
        done.append(f"unmounted pycriu's cache from {CACHE}")
    if done and filesystem_of(CACHE.parent) != "tmpfs":
        try:
            if CACHE.stat().st_size == 0:  # the mount point pycriu made; a real cache is CRIU's
                CACHE.unlink()
                done.append(f"removed the empty mount point {CACHE}")
        except FileNotFoundError:
            pass
    keep = _keep_fd(create=False)
    if keep is not None:
        try:
            for name in ("criu.kdat", "criu.kdat.json", "kdat.lock"):
                try:
                    os.unlink(name, dir_fd=keep)
                    done.append(f"removed {_KEEP / name}")
                except FileNotFoundError:
                    pass
        finally:
            os.close(keep)
        try:
            os.rmdir(_KEEP)
        except OSError:
            pass  # something else of pycriu's is kept there
    return done


def _make(binary: str, keep: int, timeout: float) -> None:
    # CRIU writes its cache during any command's kernel probe; in a private mount namespace with a
    # tmpfs on /run it keeps it, and prints it back on stdout
    script = 'mount -t tmpfs -o size=1m,mode=0700 pycriu-kdat /run && "$0" check >/dev/null 2>&1; cat /run/criu.kdat'
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, binary],
                         capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL).stdout
    if not _valid(out):
        return
    _write(keep, "criu.kdat", out)
    _write(keep, "criu.kdat.json", json.dumps(_stamp(binary)).encode())
    while _mounted_on_cache():  # an older cache (another boot's binary): replace it
        subprocess.run(["umount", str(CACHE)], capture_output=True, timeout=timeout, check=True)
    if not CACHE.exists():
        os.close(os.open(CACHE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    # through our descriptor of the checked directory, not its name
    subprocess.run(["mount", "--bind", f"/proc/{os.getpid()}/fd/{keep}/criu.kdat", str(CACHE)],
                   capture_output=True, timeout=timeout, check=True)
