"""The agent's configuration (what it accepts, its limits, where it keeps sessions) and its view
of this host's CRIU (probed in the background, see :mod:`.checks`)."""

from __future__ import annotations

import logging
import platform
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._threads import spawn
from ..criu import Criu
from ..enums import LogLevel
from ..errors import CriuError
from . import checks
from .transport import TLSConfig

__all__ = ["AgentConfig", "RESTORE_FLAGS"]

log = logging.getLogger("pycriu.agent")


#: CRIU options the source may ask the restore to use (booleans only, nothing path-like).

RESTORE_FLAGS = frozenset({"tcp_established", "tcp_close", "shell_job", "ext_unix_sk", "file_locks",
                           "link_remap", "evasive_devices", "skip_file_rwx_check", "weak_sysctls"})


@dataclass
class AgentConfig:
    """How an agent runs. ``root`` holds one private directory per session; with
    ``memory_images``, the lazy flows' images (no page but CRIU's few non-lazy ones) go to a
    memory filesystem (``/dev/shm``, when it is one with room) so that no page touches a disk."""

    root: Path
    memory_images: bool = True
    #: The source runs on this host (the ``local`` transport starts its agent so): whole images
    #: may come by hard link from the source's directory (``file-link``) instead of by copy.
    same_host: bool = False
    secret: bytes | None = None
    tls: TLSConfig | None = None
    #: With only a shared secret, serve the control channel without TLS (MAC'd, readable by
    #: anyone on the path: the explicit opt-out of :mod:`.controltls`)
    insecure_plaintext: bool = False
    data_address: str | None = None
    #: Addresses besides the peer's own where a source's page server may be (multi-homed sources).
    page_server_addresses: tuple[str, ...] = ()
    criu_binary: str | None = None
    commit_timeout: float = 120.0
    idle_timeout: float = 600.0
    lazy_timeout: float = 3600.0
    max_file_size: int = 64 << 30
    max_session_bytes: int = 256 << 30
    max_files: int = 100_000
    log_level: LogLevel = LogLevel.INFO
    #: What a container migration may name on this host (:mod:`.containers`): directories its
    #: paths must be under, cgroup paths, host interfaces of veth pairs, and the runc binary
    #: that restores runc containers (``None``: runc containers are refused).
    container_paths: tuple[Path, ...] = ()
    container_cgroups: tuple[str, ...] = ()
    container_interfaces: tuple[str, ...] = ()
    runc: str | None = None
    _criu: Criu | None = field(default=None, repr=False)
    _local: dict[str, Any] | None = field(default=None, repr=False)
    _probe: Future[dict[str, Any]] | None = field(default=None, repr=False)
    _probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def criu(self) -> Criu:
        if self._criu is None:
            self._criu = Criu(self.criu_binary)
        return self._criu

    def prefetch(self) -> None:
        """Start probing this host's CRIU in the background (at agent start-up, before the
        source's ``hello`` arrives, so that the checks cost the migration no extra wait)."""
        with self._probe_lock:
            if self._probe is None:
                self._local = None
                self._probe = spawn(self._probe_now, name="pycriu-agent-checks")

    def _probe_now(self) -> dict[str, Any]:
        info: dict[str, Any] = {"pycriu": __version__, "arch": platform.machine(), "kernel": platform.release(),
                                "criu": "unknown", "criu_check": False, "criu_error": None,
                                "features": {"lazy_pages": False, "mem_track": False}, "checks_cached": False,
                                "checks_seconds": 0.0}
        try:
            self._criu = Criu(self.criu_binary)  # per session: CRIU's version is asked again
            host = checks.probe(self._criu)
            info.update(criu=host.criu, criu_check=True, checks_cached=host.cached, checks_seconds=host.seconds,
                        features={"lazy_pages": host.lazy_pages, "mem_track": host.mem_track})
        except CriuError as exc:
            info["criu_error"] = str(exc).splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - reported to the source as a failed check
            info["criu_error"] = f"{type(exc).__name__}: {exc}"
        return info

    def local_info(self, *, fresh: bool = False) -> dict[str, Any]:
        """This host's CRIU version, ``criu check`` result and features (see
        :mod:`pycriu.migration.checks`: the version is asked every time, a successful check is
        cached). ``fresh``: probe again unless a prefetched result is waiting."""
        with self._probe_lock:
            probe = self._probe
            if probe is None and (fresh or self._local is None):
                self._local = None
                probe = self._probe = spawn(self._probe_now, name="pycriu-agent-checks")
        if probe is not None:
            info = probe.result()  # _probe_now reports every failure in its result
            with self._probe_lock:
                if self._probe is probe:
                    self._local, self._probe = info, None
            return info
        assert self._local is not None
        return self._local
