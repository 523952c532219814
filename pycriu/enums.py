"""Enumerations of CRIU's option values, built from libcriu's own C constants."""

from __future__ import annotations

import enum

from ._raw import CONSTANTS as _C

__all__ = ["LogLevel", "CgroupMode", "NetworkLockMethod", "PreDumpMode", "Namespace", "NotifyAction"]


class LogLevel(enum.IntEnum):
    """CRIU's log verbosity (``-v0`` .. ``-v4``)."""

    MSG = _C["CRIU_LOG_MSG"]
    ERROR = _C["CRIU_LOG_ERROR"]
    WARN = _C["CRIU_LOG_WARN"]
    INFO = _C["CRIU_LOG_INFO"]
    DEBUG = _C["CRIU_LOG_DEBUG"]


class CgroupMode(enum.IntEnum):
    """``--manage-cgroups`` mode."""

    IGNORE = _C["CRIU_CG_MODE_IGNORE"]
    NONE = _C["CRIU_CG_MODE_NONE"]
    PROPS = _C["CRIU_CG_MODE_PROPS"]
    SOFT = _C["CRIU_CG_MODE_SOFT"]
    FULL = _C["CRIU_CG_MODE_FULL"]
    STRICT = _C["CRIU_CG_MODE_STRICT"]
    DEFAULT = _C["CRIU_CG_MODE_DEFAULT"]


class NetworkLockMethod(enum.IntEnum):
    """How CRIU locks the network of the tree while it is frozen (``--network-lock``)."""

    IPTABLES = _C["CRIU_NETWORK_LOCK_IPTABLES"]
    NFTABLES = _C["CRIU_NETWORK_LOCK_NFTABLES"]
    SKIP = _C["CRIU_NETWORK_LOCK_SKIP"]


class PreDumpMode(enum.IntEnum):
    """How pre-dump reads memory (``--pre-dump-mode``): splice pages (default) or process_vm_readv."""

    SPLICE = _C["CRIU_PRE_DUMP_SPLICE"]
    READ = _C["CRIU_PRE_DUMP_READ"]


class Namespace(enum.IntFlag):
    """Namespace flags (``CLONE_NEW*``), for ``empty_ns``."""

    NET = _C["CLONE_NEWNET"]
    MNT = _C["CLONE_NEWNS"]
    PID = _C["CLONE_NEWPID"]
    UTS = _C["CLONE_NEWUTS"]
    IPC = _C["CLONE_NEWIPC"]
    USER = _C["CLONE_NEWUSER"]
    CGROUP = _C["CLONE_NEWCGROUP"]


class NotifyAction(enum.StrEnum):
    """The notifications CRIU sends to a notify callback, in the order they can occur.

    A callback receives the action as a plain ``str``; unknown actions (newer CRIU) arrive as
    strings too, so compare with these members or their values.
    """

    PRE_DUMP = "pre-dump"
    NETWORK_LOCK = "network-lock"
    POST_DUMP = "post-dump"
    PRE_RESTORE = "pre-restore"
    SETUP_NAMESPACES = "setup-namespaces"
    POST_SETUP_NAMESPACES = "post-setup-namespaces"
    PRE_RESUME = "pre-resume"
    NETWORK_UNLOCK = "network-unlock"
    POST_RESTORE = "post-restore"
    POST_RESUME = "post-resume"
    STATUS_READY = "status-ready"
    ORPHAN_PTS_MASTER = "orphan-pts-master"
    QUERY_EXT_FILES = "query-ext-files"
