"""What ``pycriu inspect`` shows, as plain data: a checkpoint's processes, files, sockets,
mounts, memory and CRIU's statistics. Every class has ``to_dict`` (the ``--json`` output);
:mod:`pycriu.inspect.render` prints the same for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..images.memory import Mapping

__all__ = ["Thread", "OpenFd", "Process", "SocketInfo", "MountInfo", "Inspection"]


@dataclass(frozen=True)
class Thread:
    tid: int
    comm: str


@dataclass(frozen=True)
class OpenFd:
    """One fd of a process (``fd`` is ``cwd``/``root`` for those two)."""

    fd: int | str
    type: str
    description: str


@dataclass
class Process:
    """One process of the tree, by its pid in the tree's PID namespace (``pstree.img``)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: str
    #: ``alive``, ``stopped`` or ``zombie``
    state: str
    threads: list[Thread]
    uid: int | None
    gid: int | None
    #: the full command line, read from the process's memory in the images (``None`` when those
    #: pages are not in them: a lazy dump)
    cmdline: list[str] | None
    #: the environment, only when asked for (it holds secrets more often than not)
    environ: dict[str, str] | None
    #: namespace ids by kind (``pid``, ``net``, ...): equal ids are one namespace
    namespaces: dict[str, int]
    #: cgroup path by controller (``cpu,cpuacct``: ``/system.slice/x``)
    cgroups: dict[str, str]
    fds: list[OpenFd] = field(default_factory=list)
    mappings: list[Mapping] = field(default_factory=list)
    exit_code: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mappings"] = [m.to_dict() for m in self.mappings]
        if self.environ is None:
            del d["environ"]
        return d


@dataclass(frozen=True)
class SocketInfo:
    """A socket the tree holds, with who holds it (``pid:fd`` pairs)."""

    family: str
    proto: str
    state: str
    local: str
    remote: str
    ino: int
    holders: tuple[str, ...]


@dataclass(frozen=True)
class MountInfo:
    mnt_id: int
    parent_mnt_id: int
    mountpoint: str
    fstype: str
    source: str
    root: str
    options: str
    #: mounted from outside (``--external mnt[KEY]:...``): the key, else ``""``
    external: str
    #: the mount namespace it belongs to
    namespace: int


@dataclass
class Inspection:
    """Everything ``pycriu inspect`` knows of one checkpoint."""

    path: str
    image_version: int
    criu_run_id: str
    lsm: str
    #: the checkpoint it builds on (incremental dump), or ``""``
    parent: str
    #: bytes of page data in this checkpoint's own page images
    pages_bytes: int
    processes: list[Process]
    sockets: list[SocketInfo]
    mounts: list[MountInfo]
    #: CRIU's dump statistics (``stats-dump``): times in microseconds, counts in pages
    stats: dict[str, int]
    #: hostnames of the UTS namespaces (``utsns-N.img``), by namespace id
    hostnames: dict[int, str]
    #: the container the checkpoint came from, when the directory is a Podman / CRI-O
    #: checkpoint (its ``config.dump``)
    container: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("processes", "sockets", "mounts")}
        d["processes"] = [p.to_dict() for p in self.processes]
        d["sockets"] = [asdict(s) for s in self.sockets]
        d["mounts"] = [asdict(m) for m in self.mounts]
        return d
