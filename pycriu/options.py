"""Typed option objects for CRIU operations.

Each option object validates every keyword at construction and reads each one back as an
attribute. Options are tri-state like CRIU's own: ``None`` means "not set", and an option that is
not set is never sent to CRIU (so CRIU's default applies), which is not the same as ``False``.

Each field knows how it reaches CRIU: through a libcriu ``criu_local_*`` setter, or, for the
options rpc.proto has but libcriu has no setter for (``lazy_pages``, ``leave_stopped``,
``display_stats``, ``tls*``, ...), through a CRIU configuration file that the operation writes,
passes with ``criu_local_set_config_file`` and removes (see :mod:`pycriu._config`).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ._config import check_config_entry, check_config_key, check_config_value, read_config_file
from .enums import CgroupMode, LogLevel, Namespace, NetworkLockMethod, PreDumpMode
from .errors import InvalidOptionError

__all__ = [
    "DumpOptions",
    "PreDumpOptions",
    "RestoreOptions",
    "PageServerOptions",
    "LazyPagesOptions",
    "PageServerAddress",
    "ExternalMount",
    "InheritFd",
    "JoinNamespace",
    "VethPair",
    "CgroupRoot",
    "NotifyCallback",
    "external_mount",
    "external_namespace",
    "external_veth",
]

PathArg = str | os.PathLike[str]
NotifyCallback = Callable[[str, int], "bool | None"]


def _bad(name: str, value: Any, expected: str) -> InvalidOptionError:
    return InvalidOptionError(f"option {name}={value!r} is invalid: expected {expected}")


# --- Builders for the external resources container runtimes pass --------------------------------


@dataclass(frozen=True)
class PageServerAddress:
    """Where a dump sends its pages: CRIU's page server at ``address:port``."""

    address: str
    port: int

    def __post_init__(self) -> None:
        _check_str("page_server.address", self.address)
        if not self.address:
            raise _bad("page_server.address", self.address, "a host name or IP address")
        _check_port("page_server.port", self.port, allow_zero=False)


@dataclass(frozen=True)
class ExternalMount:
    """A mount outside the tree's mount namespace: ``--external mnt[KEY]:VALUE``.

    On dump ``key`` is the mount point inside the tree and ``value`` an identifier; on restore
    ``key`` is that identifier and ``value`` the host path to bind there.
    """

    key: str
    value: str | os.PathLike[str]

    def __post_init__(self) -> None:
        _check_str("ext_mount.key", self.key, nonempty=True)
        object.__setattr__(self, "value", _as_path("ext_mount.value", self.value))


@dataclass(frozen=True)
class InheritFd:
    """Restore-time fd hand-over (``--inherit-fd fd[N]:KEY``): give the restored tree our ``fd``
    where the dumped tree had the external resource ``key`` (for example ``pipe:[12345]``)."""

    fd: int
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.fd, int) or isinstance(self.fd, bool) or self.fd < 0:
            raise _bad("inherit_fd.fd", self.fd, "an open file descriptor (int >= 0)")
        _check_str("inherit_fd.key", self.key, nonempty=True)


@dataclass(frozen=True)
class JoinNamespace:
    """Restore into an existing namespace (``--join-ns NS:FILE[,EXTRA]``)."""

    ns: str
    ns_file: PathArg
    extra: str | None = None

    NAMES: ClassVar[frozenset[str]] = frozenset({"net", "uts", "ipc", "pid", "mnt", "user", "cgroup", "time"})

    def __post_init__(self) -> None:
        if self.ns not in self.NAMES:
            raise _bad("join_ns.ns", self.ns, f"one of {sorted(self.NAMES)}")
        object.__setattr__(self, "ns_file", _as_path("join_ns.ns_file", self.ns_file))
        if self.extra is not None:
            _check_str("join_ns.extra", self.extra)


@dataclass(frozen=True)
class VethPair:
    """Restore a veth pair: ``inside`` in the tree's namespace, ``outside`` on the host."""

    inside: str
    outside: str

    def __post_init__(self) -> None:
        _check_str("veth.inside", self.inside, nonempty=True)
        _check_str("veth.outside", self.outside, nonempty=True)


@dataclass(frozen=True)
class CgroupRoot:
    """``--cgroup-root [CONTROLLER:]PATH`` (``controller`` ``None``: every hierarchy; ``""``:
    the cgroup v2 hierarchy alone, CRIU's ``:PATH``). On
    restore: put the tree's cgroups of that controller under ``path``. On dump (with
    ``manage_cgroups``): take ``path`` as the root of the tree's cgroups, so that the empty
    cgroups below it are dumped too, not only those holding a task."""

    path: PathArg
    controller: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _as_path("cgroup_root.path", self.path))
        if self.controller is not None:
            _check_str("cgroup_root.controller", self.controller)


def external_mount(key: str, value: str) -> str:
    """``--external mnt[KEY]:VALUE``, for ``external=[...]``."""
    return f"mnt[{key}]:{value}"


def external_namespace(kind: str, inode: int, key: str) -> str:
    """``--external KIND[INODE]:KEY`` for ``external=[...]`` on dump: the namespace with this
    inode is not part of the tree; on restore pass ``InheritFd(fd, key)`` for it."""
    return f"{kind}[{inode}]:{key}"


def external_veth(inside: str, outside: str) -> str:
    """``--external veth[INSIDE]:OUTSIDE``, for ``external=[...]`` on restore."""
    return f"veth[{inside}]:{outside}"


# --- Validation helpers ---------------------------------------------------------------------------


def _check_str(name: str, value: Any, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise _bad(name, value, "a string")
    if "\0" in value:
        raise _bad(name, value, "a string without NUL bytes")
    if nonempty and not value:
        raise _bad(name, value, "a non-empty string")


def _check_port(name: str, value: Any, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise _bad(name, value, f"a TCP port number from {low} to 65535")


def _as_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise _bad(name, value, "a path (str or os.PathLike)")
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text or "\0" in text:
        raise _bad(name, value, "a non-empty path without NUL bytes")
    return text


def _check_pidfd_store_sk(value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise _bad("pidfd_store_sk", value, "the fd (int >= 0) of an AF_UNIX SOCK_DGRAM socket")


def _check_items(name: str, value: Any, cls: type) -> tuple[Any, ...] | None:
    """A list field of ``cls`` items, as a tuple (``None`` stays unset)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(isinstance(v, cls) for v in value):
        raise _bad(name, value, f"a list of {cls.__name__}")
    return tuple(value)


# --- Field specification --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Via:
    """How one field reaches CRIU."""

    kind: str  # bool | int | uint | str | path | enum | strs | paths | ints | special
    setter: str | None = None  # libcriu criu_local_<setter>
    config: str | None = None  # CRIU long option written to the config file
    enum: type[enum.Enum] | None = None


def _opt(kind: str, *, setter: str | None = None, config: str | None = None,
         enum_type: type[enum.Enum] | None = None, doc: str = "") -> Any:
    return field(default=None, metadata={"via": _Via(kind, setter, config, enum_type), "doc": doc})


def _validate_value(name: str, via: _Via, value: Any) -> Any:
    """Check one field value; return it normalised (paths to ``str``, enums to members)."""
    k = via.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise _bad(name, value, "True, False or None (unset)")
        return value
    if k in ("int", "uint"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(name, value, "an integer")
        if k == "uint" and not 0 <= value <= 0xFFFFFFFF:
            raise _bad(name, value, "an integer from 0 to 4294967295")
        return value
    if k == "str":
        _check_str(name, value, nonempty=True)
        return value
    if k == "path":
        return _as_path(name, value)
    if k == "enum":
        assert via.enum is not None
        try:
            return via.enum[value.upper()] if isinstance(value, str) else via.enum(value)
        except (KeyError, ValueError):
            names = ", ".join(m.name.lower() for m in via.enum)
            raise _bad(name, value, f"one of {names}") from None
    if k == "strs":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _bad(name, value, "a list of strings")
        for item in value:
            _check_str(name, item, nonempty=True)
        return tuple(value)
    if k == "paths":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _bad(name, value, "a list of paths")
        return tuple(_as_path(name, item) for item in value)
    if k == "ints":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            raise _bad(name, value, "a list of non-negative integers")
        return tuple(value)
    return value


# a base only: its subclasses generate their own __init__, __repr__ and __eq__ (generating them
# here too would cost import time for nothing)
@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class _CriuOptions:
    """Options shared by dump, pre-dump and restore."""

    images_dir: PathArg
    work_dir: PathArg | None = _opt("special", doc="where CRIU writes its log and stats (default: images_dir)")
    log_file: str | None = _opt("special", doc="log file name inside work_dir")
    log_level: LogLevel | int | str | None = _opt("enum", setter="set_log_level", enum_type=LogLevel)
    notify: NotifyCallback | None = _opt("special", doc="callable(action, pid) -> bool | None")
    # the config file, not criu_local_set_timeout: libcriu 4.2.1 sets the RPC's value without
    # has_timeout, so CRIU never saw it and kept its 10 s
    timeout: int | None = _opt("uint", config="timeout")
    root: PathArg | None = _opt("path", setter="set_root")
    shell_job: bool | None = _opt("bool", setter="set_shell_job")
    ext_unix_sk: bool | None = _opt("bool", setter="set_ext_unix_sk")
    tcp_established: bool | None = _opt("bool", setter="set_tcp_established")
    tcp_close: bool | None = _opt("bool", setter="set_tcp_close")
    file_locks: bool | None = _opt("bool", setter="set_file_locks")
    evasive_devices: bool | None = _opt("bool", setter="set_evasive_devices")
    link_remap: bool | None = _opt("bool", setter="set_link_remap")
    force_irmap: bool | None = _opt("bool", setter="set_force_irmap")
    manage_cgroups: bool | None = _opt("bool", setter="set_manage_cgroups")
    cgroup_mode: CgroupMode | int | str | None = _opt("enum", setter="set_manage_cgroups_mode", enum_type=CgroupMode)
    cgroup_props: str | None = _opt("str", setter="add_cg_props")
    cgroup_props_file: PathArg | None = _opt("path", setter="add_cg_props_file")
    cgroup_dump_controllers: Sequence[str] | None = _opt("strs", setter="add_cg_dump_controller")
    cgroup_yard: PathArg | None = _opt("path", setter="add_cg_yard")
    auto_ext_mnt: bool | None = _opt("bool", setter="set_auto_ext_mnt")
    ext_sharing: bool | None = _opt("bool", setter="set_ext_sharing")
    ext_masters: bool | None = _opt("bool", setter="set_ext_masters")
    ext_mounts: Sequence[ExternalMount] | None = _opt("special")
    external: Sequence[str] | None = _opt("strs", setter="add_external")
    enable_fs: Sequence[str] | None = _opt("strs", setter="add_enable_fs")
    skip_mnt: Sequence[PathArg] | None = _opt("paths", setter="add_skip_mnt")
    unix_sk_inodes: Sequence[int] | None = _opt(
        "ints", setter="add_unix_sk",
        doc="inodes of sockets connected outside the tree that may be dumped. libcriu's "
            "``criu_local_add_unix_sk`` also turns ``ext_unix_sk`` on (as ``criu --ext-unix-sk=INO`` "
            "does), so every such socket may then be dumped, not only these; ``external=['unix[INODE]']`` "
            "names exactly the ones given. Refused with ``ext_unix_sk=False``, which libcriu rejects")
    irmap_paths: Sequence[PathArg] | None = _opt("paths", setter="add_irmap_path")
    ghost_limit: int | None = _opt("uint", setter="set_ghost_limit")
    weak_sysctls: bool | None = _opt("bool", setter="set_weak_sysctls")
    skip_file_rwx_check: bool | None = _opt("bool", setter="set_skip_file_rwx_check")
    orphan_pts_master: bool | None = _opt("bool", setter="set_orphan_pts_master")
    network_lock: NetworkLockMethod | int | str | None = _opt(
        "enum", setter="set_network_lock", enum_type=NetworkLockMethod)
    mntns_compat_mode: bool | None = _opt("bool", setter="set_mntns_compat_mode")
    lsm_profile: str | None = _opt("str", setter="set_lsm_profile")
    lsm_mount_context: str | None = _opt("str", setter="set_lsm_mount_context")
    cpu_cap: int | None = _opt("uint", setter="set_cpu_cap")
    # rpc.proto fields with no libcriu setter: sent through the CRIU config file.
    lazy_pages: bool | None = _opt("bool", config="lazy-pages")
    display_stats: bool | None = _opt("bool", config="display-stats")
    tls: bool | None = _opt("bool", config="tls")
    tls_cacert: PathArg | None = _opt("path", config="tls-cacert")
    tls_cacrl: PathArg | None = _opt("path", config="tls-cacrl")
    tls_cert: PathArg | None = _opt("path", config="tls-cert")
    tls_key: PathArg | None = _opt("path", config="tls-key")
    tls_no_cn_verify: bool | None = _opt("bool", config="tls-no-cn-verify")
    criu_options: Mapping[str, str | int | bool] | None = _opt(
        "special", doc="any other CRIU long option, written to the config file (name -> value, or True)")
    config_file: PathArg | None = _opt(
        "special", doc="a CRIU configuration file (runc's org.criu.config, crun's crun.conf): its options are "
                       "honoured together with pycriu's own; one that pycriu sets itself is refused by name")

    _operation: ClassVar[str] = "criu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "images_dir", _as_path("images_dir", self.images_dir))
        for f in dataclasses.fields(self):
            via: _Via | None = f.metadata.get("via")
            value = getattr(self, f.name)
            if via is None or value is None:
                continue
            if via.kind != "special":
                object.__setattr__(self, f.name, _validate_value(f.name, via, value))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", _as_path("work_dir", self.work_dir))
        if self.log_file is not None:
            _check_str("log_file", self.log_file, nonempty=True)
            if "/" in self.log_file:
                raise _bad("log_file", self.log_file, "a file name without '/' (it lives in work_dir)")
        if self.notify is not None and not callable(self.notify):
            raise _bad("notify", self.notify, "a callable(action: str, pid: int)")
        if self.ext_mounts is not None:
            if not all(isinstance(m, ExternalMount) for m in self.ext_mounts):
                raise _bad("ext_mounts", self.ext_mounts, "a list of ExternalMount")
            object.__setattr__(self, "ext_mounts", tuple(self.ext_mounts))
        if self.criu_options is not None:
            if not isinstance(self.criu_options, Mapping):
                raise _bad("criu_options", self.criu_options, "a mapping of CRIU option name to value")
            for key, value in self.criu_options.items():
                check_config_key(key)
                if value is not True and (isinstance(value, bool) or not isinstance(value, (str, int))):
                    raise _bad(f"criu_options[{key!r}]", value, "True (a flag), a string or an integer")
                check_config_entry(key, None if value is True else str(value))
        if self.unix_sk_inodes and self.ext_unix_sk is False:
            raise InvalidOptionError(
                "unix_sk_inodes and ext_unix_sk=False contradict each other: libcriu's "
                "criu_local_add_unix_sk turns ext_unix_sk on (and refuses the request when it was "
                "set off); to let only the sockets of these inodes be dumped, pass "
                "external=['unix[INODE]', ...] instead of unix_sk_inodes")
        if self.config_file is not None:
            object.__setattr__(self, "config_file", _as_path("config_file", self.config_file))
            read_config_file(self.config_file)  # refused now, by file and line, not at the operation
        for f in dataclasses.fields(self):
            via = f.metadata.get("via")
            value = getattr(self, f.name)
            if via is not None and via.config and value is not None and via.kind == "path":
                check_config_value(via.config, value)

    # -- what is sent --------------------------------------------------------------------------

    @property
    def log_name(self) -> str:
        """The log file name CRIU writes inside :attr:`work_dir`."""
        return self.log_file or f"{self._operation}.log"

    @property
    def log_path(self) -> Path:
        """Where CRIU's log of this operation will be."""
        return Path(self.work_dir or self.images_dir) / self.log_name

    def passed_fds(self) -> tuple[int, ...]:
        """This process's fds that the options name, by number (checked open before the operation,
        and held by CRIU's worker too): a dump's pidfd store, a restore's inherited fds."""
        return ()

    def setter_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The libcriu setter calls for every field that is set, in field order."""
        calls: list[tuple[str, tuple[Any, ...]]] = []
        for f in dataclasses.fields(self):
            via: _Via | None = f.metadata.get("via")
            value = getattr(self, f.name)
            if via is None or value is None or via.setter is None:
                continue
            if via.kind in ("strs", "paths", "ints"):
                calls.extend((via.setter, (item,)) for item in value)
            elif via.kind == "enum":
                calls.append((via.setter, (int(value),)))
            else:
                calls.append((via.setter, (value,)))
        for m in self.ext_mounts or ():
            calls.append(("add_ext_mount", (m.key, m.value)))
        calls.extend(self._extra_setter_calls())
        return calls

    def _extra_setter_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        return []

    def config_entries(self) -> list[tuple[str, str | None]]:
        """CRIU config-file lines ``(option, value or None for a flag)`` for fields with no setter.

        A boolean set to ``False`` is sent as CRIU's ``no-`` form where CRIU has one, and
        otherwise simply left out (CRIU's default for those flags is off).
        """
        # the user's file first: CRIU takes the last of repeated options, so pycriu's own win
        entries: list[tuple[str, str | None]] = read_config_file(self.config_file) if self.config_file else []
        for f in dataclasses.fields(self):
            via: _Via | None = f.metadata.get("via")
            value = getattr(self, f.name)
            if via is None or value is None or via.config is None:
                continue
            if via.kind == "bool":
                if value:
                    entries.append((via.config, None))
                elif via.config in _NO_FORMS:
                    entries.append(("no-" + via.config, None))
            else:
                entries.append((via.config, str(value)))
        entries.extend(self._extra_config_entries())
        for key, value in (self.criu_options or {}).items():
            entries.append((key, None if value is True else str(value)))
        return entries

    def _extra_config_entries(self) -> list[tuple[str, str | None]]:
        return []


# CRIU's BOOL_OPT options accept a "no-" prefix; the others are plain flags.
_NO_FORMS = frozenset({"display-stats", "tls"})


@dataclass(frozen=True, kw_only=True)
class DumpOptions(_CriuOptions):
    """Options of ``criu dump``.

    ``pid`` is the root of the tree to dump; ``images_dir`` must exist. By default CRIU kills the
    tree after a successful dump; ``leave_running`` resumes it, ``leave_stopped`` leaves it frozen.
    """

    pid: int
    leave_running: bool | None = _opt("bool", setter="set_leave_running")
    leave_stopped: bool | None = _opt("bool", config="leave-stopped")
    tcp_skip_in_flight: bool | None = _opt("bool", setter="set_tcp_skip_in_flight")
    track_mem: bool | None = _opt("bool", setter="set_track_mem")
    auto_dedup: bool | None = _opt("bool", setter="set_auto_dedup")
    parent_images: PathArg | None = _opt("path", setter="set_parent_images")
    freeze_cgroup: str | None = _opt("str", setter="set_freeze_cgroup")
    page_server: PageServerAddress | None = _opt("special", doc="send pages to CRIU's page server")
    lazy_port: int | None = _opt(
        "special", doc="with lazy_pages: the port the frozen source serves its pages on "
        "(CRIU refuses 0, and nothing would tell the destination an auto-bound port)")
    lazy_address: str | None = _opt("special", doc="with lazy_pages: the address to serve pages on")
    cgroup_roots: Sequence[CgroupRoot] | None = _opt(
        "special", doc="with manage_cgroups: the roots of the tree's cgroups, whose empty cgroups are dumped too")
    pidfd_store_sk: int | None = _opt(
        "special", doc="the fd of an ``AF_UNIX`` ``SOCK_DGRAM`` socket of this process, unbound at first, "
        "that CRIU makes its pidfd store: each pre-dump leaves there a pidfd of every task, and the "
        "next pre-dump or dump on top of it, given the same socket, tells a reused PID by them "
        "(instead of by start times)")

    _operation: ClassVar[str] = "dump"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pid, int) or isinstance(self.pid, bool) or self.pid <= 0:
            raise _bad("pid", self.pid, "the pid (int > 0) of the root of the tree to dump")
        if self.leave_running and self.leave_stopped:
            raise InvalidOptionError("leave_running and leave_stopped are exclusive: choose one")
        if self.page_server is not None and not isinstance(self.page_server, PageServerAddress):
            raise _bad("page_server", self.page_server, "a PageServerAddress(address, port)")
        if self.lazy_port is not None:
            _check_port("lazy_port", self.lazy_port, allow_zero=False)
        if self.lazy_address is not None:
            _check_str("lazy_address", self.lazy_address, nonempty=True)
            check_config_value("address", self.lazy_address)
        if (self.lazy_port is not None or self.lazy_address is not None) and not self.lazy_pages:
            raise InvalidOptionError("lazy_port/lazy_address need lazy_pages=True")
        if self.lazy_pages and self.page_server is not None:
            raise InvalidOptionError(
                "lazy_pages serves pages from the frozen source; it cannot also send them to a "
                "page server (drop page_server, or use lazy_port to choose the serving port)")
        _check_pidfd_store_sk(self.pidfd_store_sk)
        object.__setattr__(self, "cgroup_roots", _check_items("cgroup_roots", self.cgroup_roots, CgroupRoot))

    def passed_fds(self) -> tuple[int, ...]:
        """The pidfd store socket, if given (CRIU takes it from this process with pidfd_getfd)."""
        return () if self.pidfd_store_sk is None else (self.pidfd_store_sk,)

    def _extra_setter_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        calls: list[tuple[str, tuple[Any, ...]]] = [("set_pid", (self.pid,))]
        if self.page_server is not None:
            calls.append(("set_page_server_address_port", (self.page_server.address, self.page_server.port)))
        if self.pidfd_store_sk is not None:
            calls.append(("set_pidfd_store_sk", (self.pidfd_store_sk,)))
        calls.extend(("add_cg_root", (cg.controller, cg.path)) for cg in self.cgroup_roots or ())
        return calls

    def _extra_config_entries(self) -> list[tuple[str, str | None]]:
        # libcriu only accepts a page-server address as a "send to" target; the lazy dump's own
        # listening address and port go through the config file, like `criu dump --lazy-pages`.
        entries: list[tuple[str, str | None]] = []
        if self.lazy_pages and self.lazy_address is not None:
            entries.append(("address", self.lazy_address))
        if self.lazy_pages and self.lazy_port is not None:
            entries.append(("port", str(self.lazy_port)))
        return entries


@dataclass(frozen=True, kw_only=True)
class PreDumpOptions(DumpOptions):
    """Options of ``criu pre-dump``: dump memory while the tree keeps running (needs memory tracking)."""

    pre_dump_mode: PreDumpMode | int | str | None = _opt(
        "enum", setter="set_pre_dump_mode", enum_type=PreDumpMode)

    _operation: ClassVar[str] = "pre-dump"


@dataclass(frozen=True, kw_only=True)
class RestoreOptions(_CriuOptions):
    """Options of ``criu restore``; ``images_dir`` holds the dump."""

    leave_stopped: bool | None = _opt("bool", config="leave-stopped")
    restore_sibling: bool | None = _opt("special", doc="restore the tree as a child of this process")
    inherit_fds: Sequence[InheritFd] | None = _opt("special")
    exec_cmd: Sequence[str] | None = _opt("special", doc="command to exec in the restored task")
    veth_pairs: Sequence[VethPair] | None = _opt("special")
    cgroup_roots: Sequence[CgroupRoot] | None = _opt("special")
    join_ns: Sequence[JoinNamespace] | None = _opt("special")
    empty_ns: Namespace | int | None = _opt("special", doc="namespaces to restore empty (only Namespace.NET)")
    # CRIU only checks the socket on restore and never uses it: refused, naming the dump's field
    pidfd_store_sk: None = _opt("special", doc="refused: the pidfd store belongs to DumpOptions and PreDumpOptions")

    _operation: ClassVar[str] = "restore"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, cls in (("inherit_fds", InheritFd), ("veth_pairs", VethPair),
                          ("cgroup_roots", CgroupRoot), ("join_ns", JoinNamespace)):
            object.__setattr__(self, name, _check_items(name, getattr(self, name), cls))
        if self.exec_cmd is not None:
            object.__setattr__(self, "exec_cmd", _validate_value("exec_cmd", _Via("paths"), self.exec_cmd))
            if not self.exec_cmd:
                raise _bad("exec_cmd", self.exec_cmd, "a non-empty argv list")
        if self.empty_ns is not None:
            if not isinstance(self.empty_ns, int) or isinstance(self.empty_ns, bool):
                raise _bad("empty_ns", self.empty_ns, "Namespace flags")
            object.__setattr__(self, "empty_ns", Namespace(self.empty_ns))
        if self.restore_sibling is not None and not isinstance(self.restore_sibling, bool):
            raise _bad("restore_sibling", self.restore_sibling, "True, False or None")
        if self.pidfd_store_sk is not None:
            raise InvalidOptionError(
                "pidfd_store_sk is an option of DumpOptions and PreDumpOptions, not of RestoreOptions: "
                "CRIU keeps a pidfd of every task there between the iterations of a dump, to detect "
                "reused PIDs; a restore only checks the socket and never uses it")

    def passed_fds(self) -> tuple[int, ...]:
        """This process's fds that CRIU's worker must hold too (the same numbers): the inherited fds."""
        return tuple(dict.fromkeys(ifd.fd for ifd in self.inherit_fds or ()))

    def _extra_setter_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        calls: list[tuple[str, tuple[Any, ...]]] = []
        for ifd in self.inherit_fds or ():
            calls.append(("add_inherit_fd", (ifd.fd, ifd.key)))
        for veth in self.veth_pairs or ():
            calls.append(("add_veth_pair", (veth.inside, veth.outside)))
        for cg in self.cgroup_roots or ():
            calls.append(("add_cg_root", (cg.controller, cg.path)))
        for ns in self.join_ns or ():
            calls.append(("join_ns_add", (ns.ns, ns.ns_file, ns.extra)))
        if self.empty_ns is not None:
            calls.append(("set_empty_ns", (int(self.empty_ns),)))
        if self.exec_cmd is not None:
            calls.append(("set_exec_cmd", (list(self.exec_cmd),)))
        return calls


# --- Native daemons (driven through the criu binary: libcriu cannot start them) -------------------


# a base only: its subclasses generate their own __init__, __repr__ and __eq__ (generating them
# here too would cost import time for nothing)
@dataclass(frozen=True, kw_only=True, init=False, repr=False, eq=False)
class _DaemonOptions:
    """What the page server and the lazy-pages daemon share: directories, log, TLS, readiness."""

    images_dir: PathArg
    work_dir: PathArg | None = None
    log_level: LogLevel | int | str = LogLevel.INFO
    log_file: str = "daemon.log"
    tls: bool | None = None
    tls_cacert: PathArg | None = None
    tls_cacrl: PathArg | None = None
    tls_cert: PathArg | None = None
    tls_key: PathArg | None = None
    tls_no_cn_verify: bool | None = None
    timeout: float = 30.0
    #: an fd of this process that gets one zero byte when the daemon is ready (``--status-fd``)
    status_fd: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "images_dir", _as_path("images_dir", self.images_dir))
        if self.status_fd is not None and (isinstance(self.status_fd, bool) or not isinstance(self.status_fd, int)
                                           or self.status_fd < 0):
            raise _bad("status_fd", self.status_fd, "an fd (int >= 0) open for writing")
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", _as_path("work_dir", self.work_dir))
        object.__setattr__(self, "log_level", _validate_value("log_level", _Via("enum", enum=LogLevel), self.log_level))
        _check_str("log_file", self.log_file, nonempty=True)
        if "/" in self.log_file:
            raise _bad("log_file", self.log_file, "a file name without '/' (it lives in work_dir)")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise _bad("timeout", self.timeout, "seconds (> 0) to wait for readiness")
        for name in ("tls", "tls_no_cn_verify"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True, False or None (unset)")
        for name in ("tls_cacert", "tls_cacrl", "tls_cert", "tls_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_path(name, getattr(self, name)))

    @property
    def log_path(self) -> Path:
        """Where the daemon's CRIU log will be."""
        return Path(self.work_dir or self.images_dir) / self.log_file


@dataclass(frozen=True, kw_only=True)
class PageServerOptions(_DaemonOptions):
    """Options of ``criu page-server``: receive pages from a dump into ``images_dir``.

    With ``lazy_pages=True`` it instead serves the pages of a local dump in ``images_dir`` to a
    remote lazy-pages daemon (the "page server on the source" flow). ``port=0`` lets the kernel
    pick a free port; the owner object exposes the real one.
    """

    address: str = "127.0.0.1"
    port: int = 0
    lazy_pages: bool = False
    log_file: str = "page-server.log"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_str("address", self.address, nonempty=True)
        _check_port("port", self.port, allow_zero=True)
        if not isinstance(self.lazy_pages, bool):
            raise _bad("lazy_pages", self.lazy_pages, "True or False")


@dataclass(frozen=True, kw_only=True)
class LazyPagesOptions(_DaemonOptions):
    """Options of ``criu lazy-pages``: the destination daemon that fills page faults of a lazily
    restored tree through userfaultfd, reading pages from ``page_server`` (the frozen source) or,
    when ``page_server`` is ``None``, from the page images in ``images_dir``."""

    page_server: PageServerAddress | None = None
    log_file: str = "lazy-pages.log"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.page_server is not None and not isinstance(self.page_server, PageServerAddress):
            raise _bad("page_server", self.page_server, "a PageServerAddress(address, port)")
