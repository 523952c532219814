"""Reading a checkpoint into an :class:`~pycriu.inspect.model.Inspection`.

Each part comes from the images CRIU wrote for it: the tree from ``pstree.img`` and the
``core-TID.img`` of every thread, namespaces from ``ids-PID.img``, cgroups from ``cgroup.img``,
fds from ``fdinfo-N.img`` and ``files.img``, mounts from ``mountpoints-N.img``, memory maps from
``mm-PID.img`` and the pagemaps, the command line from the process's own memory (its pages are
in the images), CRIU's figures from ``stats-dump``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..images.checkpoint import Checkpoint, Entry
from ..images.errors import ImageError
from ..images.memory import PAGE_SIZE, AddressSpace, Memory
from ..images.schema import pool
from .files import FileInfo, describe, enum_name
from .model import Inspection, MountInfo, OpenFd, Process, SocketInfo, Thread

__all__ = ["inspect", "images_dir"]

_NAMESPACES = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")
#: compel's task states (compel/include/uapi/task-state.h); CRIU writes a zombie as 2 (dead)
_STATES = {1: "alive", 2: "zombie", 3: "stopped", 6: "zombie"}
#: a command line longer than this is cut (a process can make it as long as its stack)
_MAX_ARGS = 1 << 20


def images_dir(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any] | None]:
    """The images directory in ``path`` and, for a Podman / CRI-O checkpoint (the directory an
    exported checkpoint archive unpacks to: ``checkpoint/`` beside ``config.dump``), the
    container it describes."""
    p = Path(path)
    if (p / "checkpoint" / "inventory.img").is_file():
        container = None
        config = p / "config.dump"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError) as e:
                raise ImageError(f"{config}: not the JSON a container engine writes ({e})") from None
            container = {k: data.get(k) for k in ("id", "name", "rootfsImageName", "rootfsImageRef", "runtime",
                                                  "createdTime", "checkpointedTime") if k in data}
        return p / "checkpoint", container
    return p, None


def _state(core: Entry) -> str:
    # CRIU's own crit names 3 "Zombie" and 6 "Stopped" in its dicts, but 3 is a stopped task
    # and a zombie comes as 2; pycriu.images keeps crit's dicts as they are (scripts compare
    # them), and this view says what the task was.
    return _STATES.get(core.tc.task_state, f"state {core.tc.task_state}")


def _exit_code(status: int) -> int:
    """A zombie's exit code from the wait status CRIU saved (``-N``: killed by signal N)."""
    try:
        return os.waitstatus_to_exitcode(status)
    except ValueError:
        return status


def _strings(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [x.decode("utf-8", "backslashreplace") for x in parts]


def _read_strings(space: AddressSpace | None, start: int, end: int) -> list[str] | None:
    if space is None or end <= start:
        return None
    try:
        return _strings(space.read(start, min(end - start, _MAX_ARGS)))
    except ImageError:
        return None


def _cgroups(ckpt: Checkpoint) -> dict[int, dict[str, str]]:
    sets: dict[int, dict[str, str]] = {}
    for entry in ckpt.optional("cgroup.img", "CGROUP"):
        for s in entry.sets:
            sets[s.id] = {m.name: m.path for m in s.ctls}
    return sets


def _fstypes() -> dict[int, str]:
    enum = pool().FindEnumTypeByName("fstype")
    return {v.number: v.name.lower() for v in enum.values}


def _mounts(ckpt: Checkpoint, namespaces: set[int]) -> list[MountInfo]:
    names = _fstypes()
    out = []
    for ns in sorted(namespaces):
        for m in ckpt.optional(f"mountpoints-{ns}.img", "MNTS"):
            fstype = m.fsname if m.HasField("fsname") and m.fsname else names.get(m.fstype, str(m.fstype))
            external = m.ext_key if m.HasField("ext_key") else ("external" if m.ext_mount else "")
            out.append(MountInfo(m.mnt_id, m.parent_mnt_id, m.mountpoint, fstype, m.source, m.root, m.options,
                                 external, ns))
    return out


def inspect(path: str | os.PathLike[str], *, environ: bool = False, memory: Memory | None = None) -> Inspection:
    """Everything the checkpoint at ``path`` holds, as data. ``environ``: read each process's
    environment too (off by default: it often holds secrets). ``memory``: a :class:`Memory`
    of the same checkpoint to reuse (one is opened and closed here otherwise)."""
    directory, container = images_dir(path)
    own = memory is None
    mem = Memory(directory) if memory is None else memory
    try:
        return _inspect(mem, environ, container)
    finally:
        if own:
            mem.close()


def _inspect(mem: Memory, environ: bool, container: dict[str, Any] | None) -> Inspection:
    ckpt = mem.checkpoint
    inv = ckpt.inventory
    cgroups = _cgroups(ckpt)
    remaps = {r.orig_id: r.remap_type for r in ckpt.optional("remap-fpath.img", "REMAP_FPATH")}
    described: dict[int, FileInfo] = {}
    holders: dict[int, list[str]] = {}
    processes = []
    mnt_namespaces: set[int] = set()
    uts: set[int] = set()
    for entry in ckpt.pstree:
        pid = entry.pid
        core = ckpt.core(pid)
        state = _state(core)
        # a zombie has only its pid left (CRIU writes no thread list worth reading for it: the
        # entry's tid is whatever was in memory, and no core image goes with it)
        tids = [pid] if state == "zombie" else list(entry.threads)
        threads = [Thread(tid, ckpt.core(tid).thread_core.comm if tid != pid else core.tc.comm) for tid in tids]
        ids = ckpt.ids(pid) if ckpt.has(f"ids-{pid}.img") else None
        namespaces = {ns: getattr(ids, f"{ns}_ns_id") for ns in _NAMESPACES
                      if ids is not None and ids.HasField(f"{ns}_ns_id")}
        if "mnt" in namespaces:
            mnt_namespaces.add(namespaces["mnt"])
        if "uts" in namespaces:
            uts.add(namespaces["uts"])
        tcore = core.thread_core if core.HasField("thread_core") else None
        creds = tcore.creds if tcore is not None and tcore.HasField("creds") else None
        cg_set = core.tc.cg_set if core.tc.HasField("cg_set") else (tcore.cg_set if tcore is not None else 0)
        proc = Process(pid, entry.ppid, entry.pgid, entry.sid, core.tc.comm, state, threads,
                       creds.uid if creds is not None else None, creds.gid if creds is not None else None,
                       None, None, namespaces, dict(cgroups.get(cg_set, {})),
                       exit_code=_exit_code(core.tc.exit_code) if state == "zombie" else None)
        if state in ("alive", "stopped"):  # a zombie has no memory, files or fs left
            space = mem.space(pid)
            mm = ckpt.mm(pid)
            proc.mappings = space.mappings
            proc.cmdline = _read_strings(space, mm.mm_arg_start, mm.mm_arg_end)
            if environ:
                env = _read_strings(space, mm.mm_env_start, mm.mm_env_end)
                proc.environ = dict(e.partition("=")[::2] for e in env) if env is not None else None
            for fd in ckpt.fdinfo(pid) if ids is not None else []:
                info = described.get(fd.id)
                if info is None:
                    f = ckpt.files.get(fd.id)
                    info = described[fd.id] = (describe(ckpt, f, remaps) if f is not None
                                               else FileInfo(enum_name(fd, "type"), f"{enum_name(fd, 'type')} {fd.id}"))
                proc.fds.append(OpenFd(fd.fd, info.type, info.description))
                holders.setdefault(fd.id, []).append(f"{pid}:{fd.fd}")
            if ckpt.has(f"fs-{pid}.img"):
                fs = ckpt.fs(pid)
                for name, fid in (("cwd", fs.cwd_id), ("root", fs.root_id)):
                    f = ckpt.files.get(fid)
                    proc.fds.append(OpenFd(name, "REG", describe(ckpt, f, remaps).description if f is not None
                                           else f"file {fid}"))
        processes.append(proc)
    sockets = [SocketInfo(info.socket["family"], info.socket["proto"], info.socket["state"], info.socket["local"],
                          info.socket["remote"], info.socket["ino"], tuple(holders.get(fid, ())))
               for fid, info in described.items() if info.socket is not None]
    stats = ckpt.stats("dump")
    hostnames = {}
    for ns in sorted(uts):
        for u in ckpt.optional(f"utsns-{ns}.img", "UTSNS"):
            hostnames[ns] = u.nodename
    pages = sum(m.pages_images for p in processes for m in p.mappings)
    parent = ckpt.parent
    return Inspection(
        path=str(ckpt.path), image_version=inv.img_version,
        criu_run_id=inv.dump_criu_run_id if inv.HasField("dump_criu_run_id") else "",
        lsm=enum_name(inv, "lsmtype") if inv.HasField("lsmtype") else "",
        parent=str(parent.path) if parent is not None else "",
        pages_bytes=_page_bytes(ckpt) if pages else 0,
        processes=processes, sockets=sockets, mounts=_mounts(ckpt, mnt_namespaces),
        stats={f.name: v for f, v in stats.ListFields()} if stats is not None else {},
        hostnames=hostnames, container=container)


def _page_bytes(ckpt: Checkpoint) -> int:
    """Bytes of page data in the checkpoint's own ``pages-*.img`` (what a copy of it moves)."""
    total = 0
    for p in ckpt.path.glob("pages-*.img"):
        try:
            st = p.stat()
        except OSError:
            continue
        total += min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size
    return total - total % PAGE_SIZE if total > PAGE_SIZE else total
