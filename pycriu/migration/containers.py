"""Containers in a migration: what crosses to the destination, what the agent accepts of it, and
how the agent restores a container.

The source sends its :class:`~pycriu.containers.ContainerOptions` (already remapped for the
destination) and, for a runtime-owned container, where it goes (a
:class:`~pycriu.containers.RuncTarget`) in its ``hello``, so that the agent checks them before
anything is frozen. The agent accepts exactly what is safe:

* the choices (booleans, the cgroup mode, the network-lock method, LSM profile and mount
  context, an empty network namespace) always;
* what names a path of this host (the root, each mount's source, namespace files, the cgroup
  yard, a CRIU config file, a runc bundle or state directory) only inside the directories its
  operator allowed (``pycriu agent --container-path DIR``), the device nodes runc binds
  (``/dev/null``, ...) and this host's cgroup v1 controllers under ``/sys/fs/cgroup``; and it
  must exist;
* cgroup paths only under ``--container-cgroup PATH``; host ends of veth pairs only with the
  names allowed by ``--container-veth NAME``;
* a runc container only from an agent started with ``--runc``, into a bundle whose bind-mount
  sources all exist, under an id runc does not have yet;
* never an fd of the source (``inherit_fds``): it has no meaning here.

Everything else is refused by name, and the migration stops before the freeze.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..containers.options import ContainerOptions
from ..containers.runc import Runc, RuncBundle, RuncTarget, write_descriptors
from ..errors import ContainerRuntimeError, InvalidOptionError
from ..results import RestoreResult, RestoreStats, read_stats
from .errors import AgentError
from .procs import TreeResources

if TYPE_CHECKING:
    from ..criu import Criu
    from ..enums import LogLevel
    from ..options import NotifyCallback

__all__ = ["hello_field", "preflight_resources", "accept", "AcceptedContainer", "DEVICE_SOURCES"]

#: device nodes a container may have bound from any host (runc's default devices)
DEVICE_SOURCES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"})


# --- the source's side ------------------------------------------------------------------------------


def hello_field(options: ContainerOptions | None, runtime: RuncTarget | None) -> dict[str, Any] | None:
    """The ``container`` field of the source's ``hello``."""
    if options is None:
        return None
    return {"options": options.to_dict(), "runtime": runtime.to_dict() if runtime is not None else None}


def preflight_resources(resources: TreeResources) -> TreeResources:
    """A container's files are in its own root, which the source sees under host paths that mean
    nothing on the destination: the agent checks the container's root and mounts instead (at
    ``hello``), so the file checks are left out. Ports and socket paths stay (a container in the
    host's network namespace holds them on the host), and so do FIFOs and file locks: on one host
    the restored copy opens the same files, and a lock the frozen source still holds blocks its
    restore (zdtm's file_locks00 in the ns flavor hung there)."""
    return TreeResources(files={}, tcp_ports=dict(resources.tcp_ports), unix_paths=dict(resources.unix_paths),
                         fifos=dict(resources.fifos), locks=dict(resources.locks))


# --- the agent's side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedContainer:
    """A container the agent accepted: its options, and where runc takes it (or ``None``:
    pycriu restores it with the options)."""

    options: ContainerOptions
    target: RuncTarget | None
    runc: Runc | None

    @property
    def container_id(self) -> str | None:
        return self.target.id if self.target is not None else None

    def restore(self, criu: Criu, *, images: Path, work: Path, lazy: bool, notify: NotifyCallback,
                flags: Mapping[str, bool], log_level: LogLevel) -> RestoreResult:
        """Restore the container held stopped (the commit resumes it): with ``runc restore`` for a
        runc target (runc owns it from then on), else with pycriu and the accepted options."""
        if self.target is None or self.runc is None:
            extra: dict[str, Any] = dict(flags)
            with self.options.restore_options(images_dir=images, work_dir=work, log_file="restore.log",
                                              log_level=log_level, lazy_pages=True if lazy else None,
                                              leave_stopped=True, notify=notify, **extra) as opts:
                return criu.restore(opts)
        write_descriptors(images, self.options)
        choices = _choices_with_flags(self.options, flags)
        assert self.target.id is not None
        try:
            pid = self.runc.restore(self.target.id, bundle=self.target.bundle, images_dir=images, work_dir=work,
                                    options=choices, lazy=lazy, leave_stopped=True)
        except BaseException:
            self.discard()
            raise
        stats = read_stats(work / "stats-restore")
        return RestoreResult(pid=pid, log_path=work / "restore.log",
                             stats=stats if isinstance(stats, RestoreStats) else None)

    def discard(self) -> None:
        """After a failed or uncommitted restore: runc forgets the container (its tree was
        killed), so that runc's state says what runs."""
        if self.runc is None or self.target is None or self.target.id is None:
            return
        try:
            if self.runc.state(self.target.id) is not None:
                self.runc.delete(self.target.id, force=True)
        except ContainerRuntimeError:
            pass


def _choices_with_flags(options: ContainerOptions, flags: Mapping[str, bool]) -> ContainerOptions:
    import dataclasses

    known = {f.name for f in dataclasses.fields(ContainerOptions)}
    changes: dict[str, Any] = {k: v for k, v in flags.items() if k in known}
    return dataclasses.replace(options, **changes)


def accept(field: Any, *, paths: Sequence[Path], cgroups: Sequence[str], interfaces: Sequence[str],
           runc_binary: str | None, criu_binary: str | None) -> AcceptedContainer:
    """Check the ``container`` field of a ``hello`` against what this agent allows; raise
    :class:`AgentError` (code ``refused``) naming every option refused."""
    if not isinstance(field, Mapping) or set(field) - {"options", "runtime"} or "options" not in field:
        raise AgentError("hello.container: expected {options: {...}, runtime: {...} | null}", code="refused")
    try:
        options = ContainerOptions.from_dict(field["options"])
        target = RuncTarget.from_dict(field["runtime"]) if field.get("runtime") is not None else None
    except (InvalidOptionError, TypeError) as exc:
        raise AgentError(f"container options refused: {exc}", code="refused") from None
    problems: list[str] = []
    if options.inherit_fds:
        problems.append("inherit_fds: fds of the source process have no meaning on the destination")
    runc = None
    if target is not None:
        runc = _check_runc(target, paths, runc_binary, criu_binary, problems)
        # runc builds the root, the mounts, namespaces and cgroups from the bundle: of the
        # options, only the choices are used, and those that name this host are checked
        names = [(n, k, v) for n, k, v in options.host_names() if n in ("cgroup_yard", "config_file")
                 or n.startswith("veth_pairs")]
    else:
        names = options.host_names()
    for name, kind, value in names:
        problem = _check_name(name, kind, value, paths, cgroups, interfaces)
        if problem:
            problems.append(problem)
    if problems:
        raise AgentError("container refused: " + "; ".join(problems), code="refused")
    if target is not None and target.id is None:
        raise AgentError("container refused: the runc target names no container id", code="refused")
    return AcceptedContainer(options, target, runc)


def _check_runc(target: RuncTarget, paths: Sequence[Path], runc_binary: str | None, criu_binary: str | None,
                problems: list[str]) -> Runc | None:
    before = len(problems)
    if runc_binary is None:
        problems.append("runtime runc: this agent does not restore runc containers (start it with --runc)")
    for name, value in (("runtime.bundle", target.bundle), ("runtime.root", target.root)):
        if value is not None and not _under(value, paths):
            problems.append(_outside(name, value, paths))
    if len(problems) > before or runc_binary is None:
        return None
    runc = Runc(binary=runc_binary, root=target.root, criu=criu_binary)
    bundle = RuncBundle(target.bundle)
    try:
        missing = bundle.missing_sources()
        rootfs = bundle.rootfs
    except InvalidOptionError as exc:
        problems.append(f"runtime.bundle: {exc.message}")
        return None
    if not os.path.isdir(rootfs):
        problems.append(f"runtime.bundle: its rootfs {rootfs} is missing on the destination")
    problems += [f"runtime.bundle: bind-mount source missing on the destination: {m}" for m in missing]
    if target.id is not None:
        try:
            if runc.state(target.id) is not None:
                problems.append(f"runtime.id: runc already has a container {target.id!r} in {runc.state_root}")
        except ContainerRuntimeError as exc:
            problems.append(f"runtime runc: {exc.message}")
    return runc


def _check_name(name: str, kind: str, value: str, paths: Sequence[Path], cgroups: Sequence[str],
                interfaces: Sequence[str]) -> str | None:
    if kind == "fd":
        return f"{name}: an fd of the source process has no meaning on the destination"
    if kind == "cgroup":
        if not any(_within(value, c) for c in cgroups):
            return (f"{name}={value!r}: cgroup outside what this agent allows "
                    f"({', '.join(cgroups) or 'none: start it with --container-cgroup PATH'})")
        return None
    if kind == "interface":
        if value not in interfaces:
            return (f"{name}={value!r}: host interface not allowed here "
                    f"({', '.join(interfaces) or 'none: start the agent with --container-veth NAME'})")
        return None
    if value in DEVICE_SOURCES:
        return None if _is_char_device(value) else f"{name}={value!r}: not a character device on the destination"
    if name.startswith("mounts[") and _within(value, "/sys/fs/cgroup"):
        return None if os.path.isdir(value) else f"{name}={value!r}: missing on the destination"
    if not _under(value, paths):
        return _outside(name, value, paths)
    if not os.path.exists(value):
        return f"{name}={value!r}: missing on the destination"
    return None


def _outside(name: str, value: str, paths: Sequence[Path]) -> str:
    allowed = ", ".join(map(str, paths)) or "none: start it with --container-path DIR"
    return f"{name}={value!r}: path outside the directories this agent allows ({allowed})"


def _under(value: str, paths: Sequence[Path]) -> bool:
    """Whether ``value`` is inside one of ``paths`` once its directory's symlinks are resolved
    (its last component is not: a namespace file is a magic link)."""
    try:
        real = os.path.join(os.path.realpath(os.path.dirname(value)), os.path.basename(value))
    except OSError:
        return False
    return any(_within(real, os.path.realpath(p)) for p in paths)


def _within(value: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    value = os.path.normpath(value)
    return prefix == "/" or value == prefix or value.startswith(prefix + "/")


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False
