"""zdtm's flavors: where a test runs and what CRIU is told about it.

``h`` (host): the test runs in this host's namespaces; nothing to prepare.

``ns``: as ``zdtm.py``'s ``ns_flavor``, the test program itself (zdtm's ``lib/ns.c``, asked by
``ZDTM_NEWNS=1``) clones into new PID, mount, UTS, IPC and network namespaces and pivots into
``ZDTM_ROOT``: a private bind mount of the zdtm directory, beside which this flavor creates the
system directories the test needs (``bin``, ``lib``, ``etc``, ...; the binaries' libraries and the
``.desc``'s ``deps`` are copied in). ``/dev`` is a tmpfs of its own (``ZDTM_DEV``) with a few
device nodes, bound into the root by the test and named to CRIU as an external mount:
``--external mnt[/dev]:ZDTM_DEV`` on dump, ``--external mnt[ZDTM_DEV]:DEVPATH`` on restore, with
``--root`` on both. The pidfile holds the namespace's init as this host sees it; a restore gives
it a new host PID (the PIDs inside are the dumped ones).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from ..containers.options import ContainerMount, ContainerOptions

__all__ = ["FLAVORS", "Flavor", "HostFlavor", "NsFlavor"]

#: zdtm's flavor codes that this package runs (``uns``, the user-namespace flavor, is not done)
FLAVORS = ("h", "ns")

_MNT_DETACH = 2


class Flavor:
    """The host flavor, and the interface of the others."""

    name = "h"

    def env(self) -> dict[str, str]:
        """The environment ``make NAME.pid`` starts the test with (on top of this process's)."""
        return {}

    def start_dir(self, static_dir: Path) -> Path:
        """The directory ``make -C`` runs in (its path is the test's working directory)."""
        return static_dir

    def prepare(self, binary: Path, deps: list[str]) -> None:
        """Make ``binary`` and the ``.desc``'s ``deps`` runnable where the test will run."""

    def dump_opts(self) -> list[str]:
        return []

    def restore_opts(self) -> list[str]:
        return []

    def container(self) -> ContainerOptions | None:
        """The same options for :class:`pycriu.Migration` (``container=``), or ``None``."""
        return None

    def agent_command(self) -> list[str] | None:
        """The local agent :class:`pycriu.Migration` starts (``None``: its default)."""
        return None

    def __enter__(self) -> Flavor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


class HostFlavor(Flavor):
    """``h``: the test in this host's namespaces."""


def umount_detached(path: str) -> None:
    """``umount2(path, MNT_DETACH)``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({path}): {os.strerror(err)}")


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise OSError(f"mount {' '.join(args)}: {r.stderr.strip()}")


_LDD_SKIP = re.compile(r"^(linux-gate\.so|linux-vdso(64)?\.so|not a dynamic|statically linked)")


def libraries(binary: Path) -> list[str]:
    """The shared libraries ``binary`` loads (``ldd``'s paths, the vDSO left out)."""
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    out = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if not line or _LDD_SKIP.match(line):
            continue
        parts = line.split()
        path = parts[2] if len(parts) > 2 and parts[1] == "=>" else parts[0]
        if path.startswith("/"):
            out.append(path)
    return out


class NsFlavor(Flavor):
    """``ns``: the test in new namespaces with the zdtm directory as its root (see the module).

    A context manager: entering mounts the root and ``/dev``, leaving unmounts them and removes
    the temporary directory. The system directories it creates in the zdtm directory stay (a
    second run reuses them, as ``zdtm.py``'s ``.constructed``)."""

    name = "ns"
    ROOT_DIRS = ("bin", "sbin", "etc", "lib", "lib64", "dev", "tmp", "usr", "proc", "run")
    DEV_KEY = "ZDTM_DEV"

    def __init__(self, zdtm_dir: Path) -> None:
        self.zdtm_dir = Path(zdtm_dir).resolve()
        self._tmp: str | None = None
        self._mounted: list[str] = []

    @property
    def root(self) -> str:
        assert self._tmp is not None, "NsFlavor is used as a context manager"
        return os.path.join(self._tmp, "root", "root")

    @property
    def devpath(self) -> str:
        assert self._tmp is not None, "NsFlavor is used as a context manager"
        return os.path.join(self._tmp, "dev")

    def __enter__(self) -> NsFlavor:
        self._tmp = tempfile.mkdtemp(prefix="criu-root-", dir=os.environ.get("TMPDIR", "/tmp"))
        try:
            os.makedirs(self.root)
            os.mkdir(self.devpath)
            _mount("-t", "tmpfs", "criu-test-dev", self.devpath)
            self._mounted.append(self.devpath)
            os.chmod(self.devpath, 0o777)
            _mount("--make-private", "--bind", str(self.zdtm_dir), self.root)
            self._mounted.append(self.root)
            self._construct_root()
            self._construct_dev()
            # as zdtm.py: the root's parent is closed to others (runc's root is, under /run/runc)
            os.chmod(os.path.dirname(self.root), 0o700)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        while self._mounted:
            path = self._mounted.pop()
            try:
                umount_detached(path)
            except OSError:
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _construct_root(self) -> None:
        for d in self.ROOT_DIRS:
            p = self.zdtm_dir / d
            if not p.exists():
                p.mkdir()
                p.chmod(0o777)
        for d in ("bin", "sbin", "lib", "lib64"):
            link = self.zdtm_dir / "usr" / d
            if not link.is_symlink() and not link.exists():
                link.symlink_to(f"../{d}")

    def _mknod(self, name: str, rdev: int | None = None) -> None:
        kind = stat.S_IFCHR
        if rdev is None:
            try:
                st = os.stat(os.path.join("/dev", name))
            except OSError:
                return  # zdtm.py skips a device this host lacks
            rdev = st.st_rdev
            if stat.S_ISBLK(st.st_mode):
                kind = stat.S_IFBLK
        path = os.path.join(self.devpath, name)
        os.mknod(path, kind | 0o666, rdev)
        os.chmod(path, 0o666)

    def _construct_dev(self) -> None:
        for d in ("pts", "net"):
            os.mkdir(os.path.join(self.devpath, d), 0o755)
        self._mknod("tty", os.makedev(5, 0))
        self._mknod("null", os.makedev(1, 3))
        self._mknod("net/tun")
        self._mknod("rtc")
        self._mknod("autofs", os.makedev(10, 235))

    def _copy(self, path: str) -> None:
        """``path`` of this host at the same path under the root (once; atomically)."""
        target = self.zdtm_dir / path.lstrip("/")
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(".tso", "", str(target.parent))
        os.close(fd)
        shutil.copy2(path, tmp)
        os.rename(tmp, target)

    def prepare(self, binary: Path, deps: list[str]) -> None:
        for lib in libraries(binary):
            self._copy(lib)
        for dep in deps:
            # a dep is "a|b": the first of them this host has (zdtm.py's __copy_deps)
            for candidate in dep.split("|"):
                if os.access(candidate, os.F_OK):
                    self._copy(candidate)
                    for lib in libraries(Path(candidate)):
                        self._copy(lib)
                    break
            else:
                raise FileNotFoundError(f"none of {dep} exists on this host (a dependency of {binary.name})")

    def env(self) -> dict[str, str]:
        return {"ZDTM_NEWNS": "1", "ZDTM_ROOT": self.root, "ZDTM_DEV": self.devpath,
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

    def start_dir(self, static_dir: Path) -> Path:
        # inside the root, so that the test's working directory is /static after its pivot_root
        return Path(self.root) / Path(static_dir).resolve().relative_to(self.zdtm_dir)

    def dump_opts(self) -> list[str]:
        return ["--root", self.root, "--external", f"mnt[/dev]:{self.DEV_KEY}"]

    def restore_opts(self) -> list[str]:
        return ["--root", self.root, "--external", f"mnt[{self.DEV_KEY}]:{self.devpath}"]

    def agent_command(self) -> list[str]:
        # the agent restores a container only under the paths it is told to allow
        assert self._tmp is not None, "NsFlavor is used as a context manager"
        return [sys.executable, "-m", "pycriu.migration.agent", "--stdio", "--same-host",
                "--container-path", self._tmp]

    def container(self) -> ContainerOptions:
        return ContainerOptions(root=self.root,
                                mounts=(ContainerMount("/dev", self.devpath, key=self.DEV_KEY),))
