"""The session's directory on the agent: every file a peer sends lands in one of its
subdirectories, opened once by file descriptor and never by a path the peer wrote; images may
live in memory instead; a failed session's CRIU logs are kept for the operator (the newest
:data:`KEEP_FAILED`), everything else is removed when the session ends."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ProtocolError
from .images import DirUsage, dir_usage
from .protocol import check_dir_name

__all__ = ["KEEP_FAILED", "SessionDir", "criu_logs"]

log = logging.getLogger("pycriu.agent")

#: Failed sessions whose CRIU logs are kept for the operator; older ones are removed.
KEEP_FAILED = 16

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SessionDir:
    """``ROOT/NAME``: ``work/`` (CRIU's logs, the guard's log), ``images/`` and the pre-dump
    iterations' directories, each opened once and kept open until :meth:`close`."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.path: Path | None = None  # set by create()
        self.memory: Path | None = None  # the images directory, when it is in memory
        self._fd: int | None = None
        self._fds: dict[str, int] = {}

    def create(self) -> None:
        """Make the session's directory (mode 0700) and its ``work/``."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / self.name
        path.mkdir(mode=0o700)
        self.path = path
        self._fd = os.open(path, _DIR_FLAGS)
        (path / "work").mkdir(mode=0o700)

    def images_in_memory(self, memory: Path) -> Path:
        """Keep ``images/`` in a fresh directory under ``memory`` (a tmpfs) instead."""
        self.memory = Path(tempfile.mkdtemp(prefix=f"pycriu-agent-{self.name}-", dir=memory))
        self._fds["images"] = os.open(self.memory, _DIR_FLAGS)
        return self.memory

    def own(self, name: str, *, create: bool = True) -> Path:
        """A directory of the agent's own (``tls``): one no peer can name, since
        :func:`check_dir_name` refuses it, so that no file of a peer lands in it."""
        assert self.path is not None
        path = self.path / name
        if create:
            path.mkdir(mode=0o700)
        return path

    @property
    def work(self) -> Path:
        assert self.path is not None
        return self.path / "work"

    def subdir(self, name: str) -> int:
        """The descriptor of subdirectory ``name`` (a checked name), made on first use."""
        name = check_dir_name(name)
        fd = self._fds.get(name)
        if fd is None:
            assert self._fd is not None
            try:
                os.mkdir(name, 0o700, dir_fd=self._fd)
            except FileExistsError:
                pass
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd)
            self._fds[name] = fd
        return fd

    def subpath(self, name: str) -> Path:
        """The path of subdirectory ``name``, for CRIU (made on first use)."""
        assert self.path is not None
        self.subdir(name)
        if name == "images" and self.memory is not None:
            return self.memory
        return self.path / name

    def link_parent(self, name: str, parent: str | None) -> None:
        """Make ``name/parent`` point at an earlier pre-dump iteration (CRIU follows it)."""
        if parent is None:
            return
        parent = check_dir_name(parent)
        if parent == name or parent not in self._fds or not parent.startswith("pre-"):
            raise ProtocolError(f"parent {parent!r} is not an earlier pre-dump iteration")
        os.symlink(f"../{parent}", "parent", dir_fd=self._fds[name])  # ours, never the peer's

    def usage(self, skip: set[tuple[int, int]]) -> tuple[DirUsage, DirUsage | None]:
        """What this side wrote, on disk and in memory (``skip``: files that came by hard link)."""
        assert self.path is not None
        memory = dir_usage(self.memory, skip=skip) if self.memory is not None else None
        return dir_usage(self.path, skip=skip), memory

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        for fd in [*self._fds.values(), *([self._fd] if self._fd is not None else [])]:
            os.close(fd)
        self._fds.clear()
        self._fd = None

    def remove(self, *, failed: bool) -> None:
        """Remove the session's files; keep the CRIU logs of a failed session that has some."""
        if self.memory is not None:
            shutil.rmtree(self.memory, ignore_errors=True)
        if self.path is None or not self.path.exists():
            return
        if failed and criu_logs(self.work):
            for sub in self.path.iterdir():
                if sub.name != "work":
                    shutil.rmtree(sub, ignore_errors=True)
            log.warning("%s: session failed; CRIU logs kept in %s", self.name, self.work)
            _prune_kept(self.root, KEEP_FAILED)
        else:  # done, or refused before CRIU ran: nothing worth keeping (and no disk to fill)
            shutil.rmtree(self.path, ignore_errors=True)


def criu_logs(work: Path) -> list[Path]:
    """The CRIU logs a session's work directory holds (the guard's own log does not count)."""
    try:
        return [p for p in work.iterdir() if p.suffix == ".log" and p.name != "guard.log"]
    except OSError:
        return []


def _prune_kept(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` failed sessions' directories under ``root``, remove the rest."""
    try:
        kept = sorted((p for p in root.iterdir() if p.name.startswith("s-") and p.is_dir()),
                      key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in kept[:-keep] if len(kept) > keep else []:
        shutil.rmtree(old, ignore_errors=True)
