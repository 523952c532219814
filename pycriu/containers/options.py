"""``ContainerOptions``: every CRIU option a container runtime passes, as one typed object.

A runtime dumps and restores a container with options that come in pairs: the dump names a
mount by its mount point inside the container, the restore says which host path to bind there;
the dump names an outside network namespace by its inode, the restore hands CRIU an open fd of
the namespace to use. ``ContainerOptions`` holds each pair once (a :class:`ContainerMount`, an
:class:`ExternalNamespace`), so that :meth:`ContainerOptions.dump_fields` and
:meth:`ContainerOptions.restore_fields` give CRIU the two halves, :meth:`ContainerOptions.to_dict`
carries the whole object to a migration's destination, and :meth:`ContainerOptions.remap`
rewrites what names the source host (paths, cgroups, network interfaces) for the destination.

What cannot leave this process is kept apart: :attr:`ContainerOptions.inherit_fds` are fds of
this process, and :meth:`ContainerOptions.to_dict` refuses them by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from ..enums import CgroupMode, Namespace, NetworkLockMethod
from ..errors import InvalidOptionError
from ..options import (
    CgroupRoot,
    DumpOptions,
    ExternalMount,
    InheritFd,
    JoinNamespace,
    RestoreOptions,
    VethPair,
    _as_path,
    _bad,
    _check_str,
)

__all__ = ["ContainerOptions", "ContainerMount", "ExternalNamespace", "bind_root", "DESCRIPTORS_FILE"]

#: The file beside the images where runc keeps what the container's fds 0, 1 and 2 were.
DESCRIPTORS_FILE = "descriptors.json"


@dataclass(frozen=True)
class ContainerMount:
    """A mount that comes from outside the container (a bind mount, a masked path, a device node,
    a cgroup v1 controller): on dump CRIU records it as ``key`` instead of dumping it
    (``--external mnt[MOUNTPOINT]:KEY``), on restore it binds ``source`` there
    (``--external mnt[KEY]:SOURCE``).

    ``mountpoint`` is inside the container; ``source`` is the host path (on the destination,
    after :meth:`ContainerOptions.remap`); ``key`` is the name in the images, by default the
    mount point itself (runc's convention). Several mounts may share a key (runc's masked paths
    all use ``/dev/null``): the restore binds that key's source once.
    """

    mountpoint: str
    source: str
    key: str = ""

    def __post_init__(self) -> None:
        _check_str("mount.mountpoint", self.mountpoint, nonempty=True)
        if not self.mountpoint.startswith("/"):
            raise _bad("mount.mountpoint", self.mountpoint, "an absolute path inside the container")
        object.__setattr__(self, "source", _as_path("mount.source", self.source))
        _check_str("mount.key", self.key)
        if not self.key:
            object.__setattr__(self, "key", self.mountpoint)

    def dump(self) -> ExternalMount:
        return ExternalMount(self.mountpoint, self.key)

    def restore(self) -> ExternalMount:
        return ExternalMount(self.key, self.source)


@dataclass(frozen=True)
class ExternalNamespace:
    """A namespace the container shares with the outside (a network namespace the runtime made
    with ``ip netns``, a pod's PID namespace): CRIU leaves it out of the images. On dump it is
    named by the inode of ``path`` (``--external net[INODE]:KEY``); on restore the namespace at
    ``path`` (on the destination) is opened and handed to CRIU (``--inherit-fd fd[N]:KEY``).
    ``key`` defaults to runc's ``extRootNetNS`` / ``extRootPidNS``."""

    kind: str
    path: str
    key: str = ""

    KINDS: ClassVar[dict[str, str]] = {"net": "extRootNetNS", "pid": "extRootPidNS"}

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise _bad("namespace.kind", self.kind, f"one of {sorted(self.KINDS)} (join the others with join_ns)")
        object.__setattr__(self, "path", _as_path("namespace.path", self.path))
        _check_str("namespace.key", self.key)
        if not self.key:
            object.__setattr__(self, "key", self.KINDS[self.kind])

    def external(self) -> str:
        """The dump's ``--external`` entry: this namespace's inode, read now."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError as exc:
            raise InvalidOptionError(f"external {self.kind} namespace {self.path!r} cannot be read: "
                                     f"{os.strerror(exc.errno or 0)}",
                                     hint="name the namespace file the container uses (/proc/PID/ns/net, "
                                          "/run/netns/NAME)") from None
        return f"{self.kind}[{inode}]:{self.key}"


_BOOLS = ("manage_cgroups", "tcp_established", "tcp_close", "file_locks", "shell_job", "ext_unix_sk",
          "orphan_pts_master", "evasive_devices", "link_remap", "weak_sysctls", "skip_file_rwx_check",
          "auto_dedup", "auto_ext_mnt", "ext_sharing", "ext_masters", "mntns_compat_mode")
#: the booleans CRIU's dump takes (the rest are restore-only)
_DUMP_BOOLS = frozenset(_BOOLS) - {"weak_sysctls", "mntns_compat_mode"}
_RESTORE_BOOLS = frozenset(_BOOLS) - {"auto_dedup"}


@dataclass(frozen=True, kw_only=True)
class ContainerOptions:
    """The CRIU options of one container, dump and restore halves together.

    Every field is optional (``None`` or empty: not sent to CRIU). Paths that a restore uses
    (``root``, each mount's ``source``, namespace files, ``cgroup_yard``, ``config_file``) are
    host paths; :meth:`remap` rewrites them for another host.
    """

    #: the container's root as the host sees it (runc: its rootfs). On restore CRIU needs a mount
    #: point there: with ``bind_root`` the restore bind-mounts ``root`` on a directory of its own
    #: first, as runc does (``criu-root``).
    root: str | None = None
    bind_root: bool = False
    mounts: tuple[ContainerMount, ...] = ()
    #: other ``--external`` resources of the dump (``tty[...]``, ``unix[...]``, ...)
    external: tuple[str, ...] = ()
    namespaces: tuple[ExternalNamespace, ...] = ()
    join_ns: tuple[JoinNamespace, ...] = ()
    empty_ns: Namespace | None = None
    veth_pairs: tuple[VethPair, ...] = ()
    manage_cgroups: bool | None = None
    cgroup_mode: CgroupMode | None = None
    #: where the restore puts the container's cgroups (``--cgroup-root`` on restore)
    cgroup_roots: tuple[CgroupRoot, ...] = ()
    #: the roots of the container's cgroups on dump, whose empty cgroups are dumped too
    #: (``--cgroup-root`` on dump, with ``manage_cgroups``)
    dump_cgroup_roots: tuple[CgroupRoot, ...] = ()
    cgroup_yard: str | None = None
    #: the cgroup CRIU freezes the container with (cgroup v1: the freezer's directory)
    freeze_cgroup: str | None = None
    network_lock: NetworkLockMethod | None = None
    tcp_established: bool | None = None
    tcp_close: bool | None = None
    file_locks: bool | None = None
    shell_job: bool | None = None
    ext_unix_sk: bool | None = None
    orphan_pts_master: bool | None = None
    evasive_devices: bool | None = None
    link_remap: bool | None = None
    weak_sysctls: bool | None = None
    skip_file_rwx_check: bool | None = None
    auto_dedup: bool | None = None
    #: mounts CRIU finds to be bind mounts from outside the container are external, without a
    #: key each (``--external mnt[]``; LXC's and zdtm's way); ``ext_sharing`` / ``ext_masters``
    #: also let such a mount share propagation with, or be a slave of, the outside (``mnt[]:s``,
    #: ``mnt[]:m``). Both halves need them.
    auto_ext_mnt: bool | None = None
    ext_sharing: bool | None = None
    ext_masters: bool | None = None
    #: restore the mount namespace with CRIU's older engine (the restore alone; CRIU falls back
    #: to it by itself where the kernel lacks move_mount's set-group)
    mntns_compat_mode: bool | None = None
    lsm_profile: str | None = None
    lsm_mount_context: str | None = None
    #: the runtime's CRIU configuration file (runc's ``org.criu.config``)
    config_file: str | None = None
    #: what the container's fds 0, 1 and 2 were (runc's ``descriptors.json``): a restore hands
    #: the tree new ends for the ``pipe:[...]`` ones (``stdio`` of :meth:`restore_options`)
    stdio: tuple[str, ...] = ()
    #: fds of this process for the restore (they never cross to another host)
    inherit_fds: tuple[InheritFd, ...] = ()
    restore_sibling: bool | None = None

    #: the fields :meth:`to_dict` refuses: they name this process's fds
    LOCAL_ONLY: ClassVar[frozenset[str]] = frozenset({"inherit_fds"})

    def __post_init__(self) -> None:
        for name in ("root", "cgroup_yard", "config_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_path(name, getattr(self, name)))
        if self.freeze_cgroup is not None:
            _check_str("freeze_cgroup", self.freeze_cgroup, nonempty=True)
        for name in ("bind_root", *_BOOLS):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise _bad(name, value, "True, False or None (unset)")
        if self.bind_root and self.root is None:
            raise InvalidOptionError("bind_root needs root (the directory to bind-mount for the restore)")
        for name, cls in (("mounts", ContainerMount), ("namespaces", ExternalNamespace), ("join_ns", JoinNamespace),
                          ("veth_pairs", VethPair), ("cgroup_roots", CgroupRoot),
                          ("dump_cgroup_roots", CgroupRoot), ("inherit_fds", InheritFd)):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) \
                    or not all(isinstance(v, cls) for v in value):
                raise _bad(name, value, f"a list of {cls.__name__}")
            object.__setattr__(self, name, tuple(value))
        for name in ("external", "stdio"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise _bad(name, value, "a list of strings")
            for item in value:
                _check_str(name, item, nonempty=True)
            object.__setattr__(self, name, tuple(value))
        for name, enum_type in (("cgroup_mode", CgroupMode), ("network_lock", NetworkLockMethod)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                member = enum_type[value.upper()] if isinstance(value, str) else enum_type(value)
            except (KeyError, ValueError):
                raise _bad(name, value, "one of " + ", ".join(m.name.lower() for m in enum_type)) from None
            object.__setattr__(self, name, member)
        if self.empty_ns is not None:
            if isinstance(self.empty_ns, bool) or not isinstance(self.empty_ns, int) \
                    or Namespace(self.empty_ns) & ~Namespace.NET:
                raise _bad("empty_ns", self.empty_ns, "Namespace.NET (CRIU restores only the network empty)")
            object.__setattr__(self, "empty_ns", Namespace(self.empty_ns))
        for name in ("lsm_profile", "lsm_mount_context"):
            if getattr(self, name) is not None:
                _check_str(name, getattr(self, name), nonempty=True)
        if self.restore_sibling is not None and not isinstance(self.restore_sibling, bool):
            raise _bad("restore_sibling", self.restore_sibling, "True, False or None")
        keys: dict[str, str] = {}
        for m in self.mounts:
            if keys.setdefault(m.key, m.source) != m.source:
                raise InvalidOptionError(f"mounts: key {m.key!r} is given two sources ({keys[m.key]!r} and "
                                         f"{m.source!r}); one key binds one source")

    # -- the two halves ------------------------------------------------------------------------

    def dump_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~pycriu.DumpOptions` for this container (external
        namespaces are named by the inodes they have now)."""
        out: dict[str, Any] = {}
        if self.root is not None:
            out["root"] = self.root
        if self.mounts:
            out["ext_mounts"] = tuple(m.dump() for m in self.mounts)
        external = [*self.external, *(ns.external() for ns in self.namespaces)]
        if external:
            out["external"] = tuple(external)
        if self.dump_cgroup_roots:
            out["cgroup_roots"] = self.dump_cgroup_roots
        for name in ("cgroup_mode", "cgroup_yard", "freeze_cgroup", "network_lock", "config_file"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({name: getattr(self, name) for name in sorted(_DUMP_BOOLS) if getattr(self, name) is not None})
        return out

    def restore_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~pycriu.RestoreOptions` for this container, but for what
        needs this host prepared first (the bound root, opened namespace files, the stdio pipes):
        :meth:`restore_options` does that."""
        out: dict[str, Any] = {}
        if self.root is not None:
            out["root"] = self.root
        restore_mounts = {m.key: m.restore() for m in self.mounts}
        if restore_mounts:
            out["ext_mounts"] = tuple(restore_mounts.values())
        for name in ("join_ns", "veth_pairs", "cgroup_roots", "inherit_fds"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        for name in ("empty_ns", "cgroup_mode", "cgroup_yard", "network_lock", "lsm_profile", "lsm_mount_context",
                     "config_file", "restore_sibling"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({name: getattr(self, name) for name in sorted(_RESTORE_BOOLS)
                    if getattr(self, name) is not None})
        return out

    def dump_options(self, *, pid: int, images_dir: str | os.PathLike[str], **kw: Any) -> DumpOptions:
        """:class:`~pycriu.DumpOptions` of this container plus ``kw`` (a field set in both must
        agree)."""
        return DumpOptions(pid=pid, images_dir=images_dir, **_merge(self.dump_fields(), kw))

    @contextmanager
    def restore_options(self, *, images_dir: str | os.PathLike[str], stdio: Sequence[int] = (),
                        **kw: Any) -> Iterator[RestoreOptions]:
        """:class:`~pycriu.RestoreOptions` of this container plus ``kw``, valid inside the block:
        ``root`` bind-mounted on a directory of its own (``bind_root``), each external namespace
        file opened and handed over, and ``stdio[i]`` given where fd ``i`` was a pipe
        (:attr:`stdio`). Everything is undone when the block ends."""
        fields = self.restore_fields()
        with ExitStack() as stack:
            if self.bind_root:
                assert self.root is not None
                fields["root"] = stack.enter_context(bind_root(self.root, os.fspath(images_dir)))
            fds = list(fields.pop("inherit_fds", ()))
            for ns in self.namespaces:
                try:
                    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise InvalidOptionError(f"external {ns.kind} namespace {ns.path!r} cannot be opened: "
                                             f"{os.strerror(exc.errno or 0)}",
                                             hint="the namespace must exist where the container is restored") from None
                stack.callback(os.close, fd)
                fds.append(InheritFd(fd, ns.key))
            for i, what in enumerate(self.stdio):
                if "pipe:" in what:
                    if i >= len(stdio):
                        raise InvalidOptionError(f"fd {i} of the container was {what}: pass stdio=(fd0, fd1, fd2) "
                                                 "with a new pipe end for it")
                    fds.append(InheritFd(stdio[i], what))
            if fds:
                fields["inherit_fds"] = tuple(fds)
            yield RestoreOptions(images_dir=images_dir, **_merge(fields, kw))

    # -- the wire form and the remap -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form (for a migration's destination, or a file): everything but this
        process's fds, which are refused by name."""
        local = [name for name in sorted(self.LOCAL_ONLY) if getattr(self, name)]
        if local:
            raise InvalidOptionError(
                f"ContainerOptions.{', '.join(local)} are fds of this process and cannot cross to another host",
                hint="name what the fds stand for instead (namespaces=[ExternalNamespace(kind, path)], stdio)")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == () or (f.name == "bind_root" and not value):
                continue
            if f.name in ("cgroup_mode", "network_lock"):
                value = value.name.lower()
            elif f.name == "empty_ns":
                value = int(value)
            elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                value = [dataclasses.asdict(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContainerOptions:
        """The inverse of :meth:`to_dict`; an unknown field, or a value of the wrong kind, is an
        :class:`~pycriu.InvalidOptionError` naming it."""
        if not isinstance(data, Mapping):
            raise InvalidOptionError("container options: expected an object of field -> value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidOptionError(f"container options: unknown field(s) {', '.join(map(repr, unknown))}",
                                     hint=f"known fields: {', '.join(sorted(known))}")
        kw: dict[str, Any] = dict(data)
        for name, item_cls in _ITEMS.items():
            if name in kw:
                items = kw[name]
                if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
                    raise _bad(name, items, f"a list of {item_cls.__name__} objects")
                try:
                    kw[name] = tuple(item_cls(**i) for i in items)
                except TypeError as exc:
                    raise _bad(name, items, f"{item_cls.__name__} fields ({exc})") from None
        for name in ("external", "stdio"):
            if name in kw and isinstance(kw[name], list):
                kw[name] = tuple(kw[name])
        return cls(**kw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ContainerOptions:
        """Read :meth:`to_dict`'s form from a JSON file (``pycriu ... --container FILE``)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise InvalidOptionError(f"container options file {os.fspath(path)!r} cannot be read: {exc}") from None
        return cls.from_dict(data)

    def remap(self, *, paths: Mapping[str, str] | None = None, cgroups: Mapping[str, str] | None = None,
              interfaces: Mapping[str, str] | None = None) -> ContainerOptions:
        """The same options for another host. ``paths`` maps a source directory to the
        destination's (the longest matching prefix wins, whole path components only): it
        rewrites ``root``, every mount's ``source``, the namespace and ``join_ns`` files,
        ``cgroup_yard`` and ``config_file``. ``cgroups`` does the same for the cgroup paths of
        ``cgroup_roots``; ``interfaces`` renames the host ends of ``veth_pairs``. What the images
        hold (mount points, keys, the container's own interface names) never changes."""
        p, c, i = dict(paths or {}), dict(cgroups or {}), dict(interfaces or {})
        for name, table in (("paths", p), ("cgroups", c)):
            for k, v in table.items():
                if not (isinstance(k, str) and isinstance(v, str) and k.startswith("/") and v.startswith("/")):
                    raise _bad(f"remap {name}", f"{k!r} -> {v!r}", "absolute paths")

        def path(value: str | None) -> str | None:
            return None if value is None else _rebase(value, p)

        return dataclasses.replace(
            self, root=path(self.root), cgroup_yard=path(self.cgroup_yard), config_file=path(self.config_file),
            mounts=tuple(dataclasses.replace(m, source=_rebase(m.source, p)) for m in self.mounts),
            namespaces=tuple(dataclasses.replace(n, path=_rebase(n.path, p)) for n in self.namespaces),
            join_ns=tuple(dataclasses.replace(j, ns_file=_rebase(os.fspath(j.ns_file), p)) for j in self.join_ns),
            cgroup_roots=tuple(dataclasses.replace(r, path=_rebase(os.fspath(r.path), c)) for r in self.cgroup_roots),
            veth_pairs=tuple(dataclasses.replace(v, outside=i.get(v.outside, v.outside)) for v in self.veth_pairs))

    def host_names(self) -> list[tuple[str, str, str]]:
        """What a restore of these options uses of its host, as ``(field, kind, value)`` with kind
        ``path``, ``cgroup``, ``interface`` or ``fd``: what a destination must check before it
        accepts them (:mod:`pycriu.migration.containers`)."""
        out: list[tuple[str, str, str]] = []
        for name in ("root", "cgroup_yard", "config_file"):
            if getattr(self, name) is not None:
                out.append((name, "path", getattr(self, name)))
        out += [(f"mounts[{m.mountpoint}].source", "path", m.source) for m in self.mounts]
        out += [(f"namespaces[{n.kind}].path", "path", n.path) for n in self.namespaces]
        out += [(f"join_ns[{j.ns}].ns_file", "path", os.fspath(j.ns_file)) for j in self.join_ns]
        out += [(f"cgroup_roots[{r.controller or '*'}].path", "cgroup", os.fspath(r.path)) for r in self.cgroup_roots]
        out += [(f"veth_pairs[{v.inside}].outside", "interface", v.outside) for v in self.veth_pairs]
        out += [(f"inherit_fds[{f.key}]", "fd", str(f.fd)) for f in self.inherit_fds]
        return out


_ITEMS: dict[str, type] = {"mounts": ContainerMount, "namespaces": ExternalNamespace, "join_ns": JoinNamespace,
                           "veth_pairs": VethPair, "cgroup_roots": CgroupRoot, "dump_cgroup_roots": CgroupRoot,
                           "inherit_fds": InheritFd}


def _rebase(value: str, table: Mapping[str, str]) -> str:
    """``value`` with the longest matching source prefix of ``table`` (whole components) replaced."""
    best: tuple[str, str] | None = None
    for src, dst in table.items():
        prefix = src.rstrip("/") or "/"
        if prefix == "/" or value == prefix or value.startswith(prefix + "/"):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dst)
    if best is None:
        return value
    prefix, dst = best
    rest = value if prefix == "/" else value[len(prefix):]
    return (dst.rstrip("/") + rest) if rest and rest != "/" else dst


def _merge(fields: dict[str, Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for key, value in kw.items():
        if key in out and value is not None and out[key] != value:
            raise InvalidOptionError(f"option {key}={value!r} contradicts the container's {key}={out[key]!r}",
                                     hint="set it in one place: the ContainerOptions or the call")
        if value is not None or key not in out:
            out[key] = value
    return out


@contextmanager
def bind_root(root: str, near: str) -> Iterator[str]:
    """``root`` bind-mounted (recursively) on a new directory beside ``near``, as runc's
    ``criu-root``: CRIU restores a mount namespace only onto a mount point. Unmounted (lazily, the
    restored tree keeps its own) and removed when the block ends."""
    import ctypes
    import tempfile

    libc = ctypes.CDLL(None, use_errno=True)
    target = tempfile.mkdtemp(prefix=".criu-root-", dir=os.path.dirname(os.path.abspath(near)) or "/")
    ms_bind, ms_rec, mnt_detach = 4096, 16384, 2
    if libc.mount(root.encode(), target.encode(), None, ms_bind | ms_rec, None) != 0:
        err = ctypes.get_errno()
        os.rmdir(target)
        raise InvalidOptionError(f"cannot bind-mount the container's root {root!r} for the restore: "
                                 f"{os.strerror(err)}", hint="root must be an existing directory; run as root")
    try:
        yield target
    finally:
        libc.umount2(target.encode(), mnt_detach)
        os.rmdir(target)

