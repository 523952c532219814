"""pycriu: checkpoint, restore and live-migrate Linux process trees with CRIU.

::

    import pycriu
    criu = pycriu.Criu()
    criu.dump(pycriu.DumpOptions(pid=pid, images_dir="/srv/ckpt"))
    result = criu.restore(pycriu.RestoreOptions(images_dir="/srv/ckpt"))
    print(result.pid)

Layers: ``csrc/`` (cffi declarations) -> ``pycriu._libcriu`` (compiled) -> ``pycriu._raw`` (the only
user of ``ffi``/``lib``, with the single error check) -> options, results, enums and :class:`Criu`
-> :class:`Migration`, the destination agent and the ``pycriu`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CheckError,
    ContainerRuntimeError,
    CriuError,
    CriuNotFoundError,
    CriuPermissionError,
    CriuVersionError,
    DumpError,
    InvalidOptionError,
    KernelUnsupportedError,
    LazyPagesError,
    NoSuchProcessError,
    PageServerError,
    PidInUseError,
    PreDumpError,
    RestoreError,
    ServiceError,
)

# The core's classes load on first use, as the migration layer does: `pycriu inspect` and the
# agent start without libcriu's binding and the option classes (60 ms of every start-up).
# (``dir(pycriu)`` and ``from pycriu import *`` list them all the same.)
_CORE = {name: module for module, names in {
    'enums': ('CgroupMode', 'LogLevel', 'Namespace', 'NetworkLockMethod', 'NotifyAction', 'PreDumpMode'),
    'criu': ('MIN_CRIU_VERSION', 'Criu', 'CriuVersion', 'find_criu', 'required_version'),
    'daemons': ('LazyPages', 'PageServer'),
    'options': ('CgroupRoot', 'DumpOptions', 'ExternalMount', 'InheritFd', 'JoinNamespace', 'LazyPagesOptions',
                'PageServerAddress', 'PageServerOptions', 'PreDumpOptions', 'RestoreOptions', 'VethPair',
                'external_mount', 'external_namespace', 'external_veth'),
    'results': ('DumpResult', 'DumpStats', 'Features', 'RestoreResult', 'RestoreStats'),
}.items() for name in names}

if TYPE_CHECKING:
    from .criu import MIN_CRIU_VERSION, Criu, CriuVersion, find_criu, required_version
    from .daemons import LazyPages, PageServer
    from .enums import CgroupMode, LogLevel, Namespace, NetworkLockMethod, NotifyAction, PreDumpMode
    from .migration import (
        AgentError,
        AuthenticationError,
        Migration,
        MigrationError,
        MigrationReport,
        NoSpaceError,
        PreCopyPolicy,
        ProtocolError,
        TLSConfig,
        TransportError,
    )
    from .options import (
        CgroupRoot,
        DumpOptions,
        ExternalMount,
        InheritFd,
        JoinNamespace,
        LazyPagesOptions,
        PageServerAddress,
        PageServerOptions,
        PreDumpOptions,
        RestoreOptions,
        VethPair,
        external_mount,
        external_namespace,
        external_veth,
    )
    from .results import DumpResult, DumpStats, Features, RestoreResult, RestoreStats

# The migration layer is imported on first use (see pycriu.migration): the destination agent
# needs none of the source's side, and its start-up counts in every local migration's time.
_MIGRATION = {"AgentError", "AuthenticationError", "Migration", "MigrationError", "MigrationReport",
              "NoSpaceError", "PreCopyPolicy", "ProtocolError", "TLSConfig", "TransportError"}

__all__ = [
    "__version__", "MIN_CRIU_VERSION", "required_version", "Criu", "CriuVersion", "find_criu", "PageServer",
    "LazyPages",
    "CgroupMode", "LogLevel", "Namespace", "NetworkLockMethod", "NotifyAction", "PreDumpMode",
    "CheckError", "ContainerRuntimeError", "CriuError", "CriuNotFoundError", "CriuPermissionError",
    "CriuVersionError", "DumpError",
    "InvalidOptionError", "KernelUnsupportedError", "LazyPagesError", "NoSuchProcessError",
    "PageServerError", "PidInUseError", "PreDumpError", "RestoreError", "ServiceError",
    "CgroupRoot", "DumpOptions", "ExternalMount", "InheritFd", "JoinNamespace", "LazyPagesOptions",
    "PageServerAddress", "PageServerOptions", "PreDumpOptions", "RestoreOptions", "VethPair",
    "external_mount", "external_namespace", "external_veth",
    "DumpResult", "DumpStats", "Features", "RestoreResult", "RestoreStats",
    "Migration", "MigrationReport", "MigrationError", "AgentError", "AuthenticationError", "ProtocolError",
    "TransportError", "NoSpaceError", "PreCopyPolicy", "TLSConfig",
]


def __getattr__(name: str) -> Any:
    if name == "images":  # ``import pycriu; pycriu.images.load(f)``, as with CRIU's module (crit)
        return importlib.import_module(".images", __name__)
    if name in _CORE:
        value = getattr(importlib.import_module(f".{_CORE[name]}", __name__), name)
        globals()[name] = value
        return value
    if name not in _MIGRATION and name != "migration":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    migration = importlib.import_module(".migration", __name__)  # not `from . import`: it asks us
    if name == "migration":  # ``import pycriu; pycriu.migration`` as before it was imported lazily
        return migration
    value = getattr(migration, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
