"""``Migration``: move a live process tree to another host, losing nothing.

::

    from pycriu import Migration
    report = Migration(pid, to="ssh://host", mode="lazy").run()
    print(report)            # downtime, phases, bytes, where everything went

:meth:`Migration.run` checks both hosts before anything is frozen, runs one of the flows of
:mod:`pycriu.migration.flows`, and returns a :class:`MigrationReport`. On failure it raises
:class:`MigrationError` whose ``report`` says where the process runs now: until the commit was
sent to the destination (whose restored tree waits stopped for it), every failure resumes the
source with its memory intact; once it was sent, the source is never resumed (killed on the
agent's acknowledgement, left stopped if none came).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import breakpoints
from .._threads import interrupts_held
from ..containers.options import ContainerOptions
from ..containers.runc import RuncTarget
from ..criu import Criu
from ..enums import LogLevel
from ..errors import InvalidOptionError
from ..options import DumpOptions, PageServerAddress, RestoreOptions
from ..results import DumpResult, DumpStats
from . import containers, handover, handshake, pagetls, procs, teardown, transfer
from .agent_config import RESTORE_FLAGS
from .client import AgentClient
from .custody import STOPPED_UNCOMMITTED, Custody, ProcTree
from .errors import MigrationError
from .images import DirUsage, links_reach, memory_dir
from .modes import FLOWS, MODES
from .phases import PhaseClock, Progress
from .policy import PreCopyPolicy
from .report import MigrationReport
from .rollback import SAME_HOST_ROLLBACKS
from .transport import Connection, Destination, TLSConfig

if TYPE_CHECKING:
    from .sampling import DirtySample

__all__ = ["Migration", "MODES", "Progress", "DUMP_ONLY_OPTIONS", "DUMP_ONLY_CRIU_KEYS"]


#: DumpOptions fields a flow sets: what the dump leaves, where its images and pages go, memory tracking.
_FLOW_FIELDS = frozenset({
    "pid", "images_dir", "work_dir", "log_file", "log_level", "notify", "leave_running", "leave_stopped",
    "page_server", "lazy_pages", "lazy_port", "lazy_address", "track_mem", "parent_images", "auto_dedup",
    "tls", "tls_cacert", "tls_cacrl", "tls_cert", "tls_key", "tls_no_cn_verify",
})
#: DumpOptions fields of a container's, whose restore half the agent needs (container=ContainerOptions(...)).
_CONTAINER_FIELDS = frozenset(f.name for f in dataclasses.fields(ContainerOptions)) | {
    "ext_mounts", "ext_masters", "ext_sharing", "auto_ext_mnt", "cgroup_props", "cgroup_props_file",
    "cgroup_dump_controllers",
}
#: The :class:`~pycriu.DumpOptions` fields ``Migration(dump_options=...)`` takes: every field but
#: the ones a flow sets, the booleans both halves need (``flags``) and a container's (``container``).
DUMP_ONLY_OPTIONS: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(DumpOptions) if not f.name.startswith("_")) - RESTORE_FLAGS - _FLOW_FIELDS \
    - _CONTAINER_FIELDS


#: CRIU's own spellings that ``dump_options={"criu_options": {...}}`` may use: options of the
#: dump alone, none that changes what the dump leaves, where the pages go, or what the restore needs.
DUMP_ONLY_CRIU_KEYS: frozenset[str] = frozenset({
    "ghost-limit", "ghost-fiemap", "no-ghost-fiemap", "force-irmap", "irmap-scan-path", "skip-in-flight",
    "skip-mnt", "enable-fs", "timeout", "display-stats", "cpu-cap",
})


def _dump_extra(pid: int, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``dump_options``, checked: only :data:`DUMP_ONLY_OPTIONS`, each valid as DumpOptions has it."""
    extra = dict(given or {})
    for key in extra:
        if key in DUMP_ONLY_OPTIONS:
            continue
        if key in RESTORE_FLAGS:
            why = "the restore needs it too: pass it in flags="
        elif key in _CONTAINER_FIELDS:
            why = "it describes the container: pass container=ContainerOptions(...)"
        elif key in _FLOW_FIELDS:
            why = "the migration's flow sets it"
        else:
            why = "DumpOptions has no such field"
        raise InvalidOptionError(f"dump_options: {key!r} is not accepted ({why})",
                                 hint=f"dump_options takes {', '.join(sorted(DUMP_ONLY_OPTIONS))}")
    raw = extra.get("criu_options")
    if isinstance(raw, Mapping):
        for key in raw:
            if key not in DUMP_ONLY_CRIU_KEYS:
                raise InvalidOptionError(
                    f"dump_options: criu_options[{key!r}] is not accepted in a migration (a flow, flags= or "
                    "container= sets it, or it is not an option of the dump alone)",
                    hint=f"criu_options takes {', '.join(sorted(DUMP_ONLY_CRIU_KEYS))}")
    DumpOptions(pid=pid, images_dir=".", **extra)  # each value checked as the dump will check it
    return extra


class Migration:
    """A migration of the process tree rooted at ``pid`` to the agent at ``to``.

    Args:
        pid: root of the tree to move.
        to: ``"local"`` (a local agent subprocess with its own temporary root), an
            ``"ssh://[user@]host[:port]"`` (runs ``pycriu agent --stdio`` there with OpenSSH) or
            ``"tcp://host:port"`` (a running ``pycriu agent --listen``).
        mode: ``classic``, ``page-server``, ``lazy``, ``page-server-on-source``, ``pre-copy``,
            ``hybrid`` or ``auto`` (lazy when both hosts support lazy pages, else pre-copy when both
            track dirty memory, else page-server).
        secret: shared secret for ``tcp://`` (str or bytes, at least 16 bytes).
        tls: :class:`TLSConfig` (client certificate, key, CA) for ``tcp://`` with TLS.
        ssh_options: extra ``ssh`` arguments (``["-o", "UserKnownHostsFile=..."]``).
        identity_file: SSH private key to use.
        agent_command: the agent command line on the destination (default
            ``pycriu agent --stdio``; for ``local``, this Python's ``-m pycriu.migration.agent``).
        log_dir: where the CRIU logs of both sides are kept (default: a new
            ``pycriu-migration-*`` directory in the temporary directory; the report names it).
        keep_logs: keep that directory after the run. Default: kept when ``log_dir`` was given
            or the migration did not succeed; a successful migration without ``log_dir``
            removes its logs (a thousand migrations leave nothing in the temporary directory).
        scratch_dir: where the source writes its images (default: the temporary directory).
        policy: :class:`PreCopyPolicy` for ``pre-copy``/``hybrid``.
        timeout: seconds to wait for any one reply of the agent (restore included).
        lazy_timeout: seconds the lazy page transfer may take in the lazy flows.
        source_address: the address of this host the destination connects to for lazy pages
            (default: this host as the agent sees it).
        relay: ``relay(address) -> address`` rewrites the address a CRIU page connection is
            told to use (an SSH or other tunnel you run, or a fault injector in tests).
        progress: ``progress(Progress)`` is called as phases start and end and bytes move.
        criu: the :class:`~pycriu.Criu` to use on the source.
        flags: CRIU booleans for both dump and restore, from
            ``pycriu.migration.agent.RESTORE_FLAGS`` (``tcp_established``, ``shell_job``, ...).
        dump_options: more :class:`~pycriu.DumpOptions` fields for the source's dump, the ones
            that concern the dump only (``ghost_limit``, ``irmap_paths``, ``force_irmap``,
            ``tcp_skip_in_flight``, ``timeout``, ``criu_options``...). Fields
            a flow sets (images, page server, lazy pages, memory tracking, what the dump leaves),
            ``flags`` (both halves need them) and ``container`` fields are refused: see
            :data:`DUMP_ONLY_OPTIONS`. Checked as DumpOptions checks them, before anything runs.
        criu_tls: encrypt and authenticate CRIU's own page connections (page server, lazy
            pages) with TLS. Default: on for ``ssh://`` and ``tcp://``, off for ``local`` (the
            pages never leave this host). With ``tls``, CRIU uses those certificates (and checks
            that they name the hosts' data addresses); otherwise each migration makes its own
            throw-away CA and certificates (:mod:`pycriu.migration.pagetls`). ``False`` sends
            the pages in the clear (a trusted, private link).
        insecure_plaintext: with ``tcp://`` and only a ``secret``, talk to the agent without
            TLS (the agent must be started with ``--insecure-plaintext`` too). The control
            channel is then only authenticated and MAC'd: in classic mode it carries the
            process's memory, readable by anyone on the path. Default: TLS bound to the secret
            (:mod:`pycriu.migration.controltls`).
        container: the tree is a container: :class:`~pycriu.containers.ContainerOptions` for its
            dump, whose restore half (remapped for the destination,
            :meth:`~pycriu.containers.ContainerOptions.remap`) crosses to the agent, which
            checks it before anything is frozen (:mod:`pycriu.migration.containers`).
        runtime: with ``container``, a :class:`~pycriu.containers.RuncTarget`: the destination
            restores with ``runc restore`` into that bundle, and runc owns the container there.
            :meth:`pycriu.containers.RuncContainer.migrate` builds both from a runc container.
        same_host_rollback: on one host (``to="local"``), what a failure after the freeze
            brings the source back from (:mod:`pycriu.migration.rollback`). ``"auto"`` (the
            default) ends the source at the dump, as ``criu dump`` does, in every flow that can
            (classic, page-server, page-server-on-source): its complete images on this host are
            the rollback, and the restore reuses its memory instead of taking a second copy's;
            lazy, pre-copy and hybrid keep the stopped source (their pages come from it). A tree
            holding host-wide names (listening ports, socket paths, FIFOs, locks, its PIDs in
            the destination's PID namespace) needs the images in any case: lazy then runs as
            page-server-on-source, pre-copy and hybrid are refused. A container holding none
            keeps its stopped source (its runtime, not the rollback, sets up what its images
            need). ``"stopped-source"``: the source stays frozen until the destination runs
            (nothing to restore, at the cost of a second copy of its memory; refused for a tree
            holding names). ``"images"``: the images wherever a flow can end the source (lazy
            runs as page-server-on-source; pre-copy, hybrid and a container without names are
            refused). The report's ``rollback_plan`` says which applied.
    """

    def __init__(self, pid: int, to: str = "local", mode: str = "auto", *,
                 secret: str | bytes | None = None, tls: TLSConfig | None = None,
                 ssh_options: Sequence[str] = (), identity_file: str | os.PathLike[str] | None = None,
                 agent_command: Sequence[str] | None = None, log_dir: str | os.PathLike[str] | None = None,
                 scratch_dir: str | os.PathLike[str] | None = None, policy: PreCopyPolicy | None = None,
                 timeout: float = 120.0, lazy_timeout: float = 600.0, source_address: str | None = None,
                 relay: Callable[[PageServerAddress], PageServerAddress] | None = None,
                 progress: Callable[[Progress], None] | None = None, criu: Criu | None = None,
                 flags: Mapping[str, bool] | None = None, criu_tls: bool | None = None,
                 insecure_plaintext: bool = False, keep_logs: bool | None = None,
                 container: ContainerOptions | None = None, runtime: RuncTarget | None = None,
                 dump_options: Mapping[str, Any] | None = None, same_host_rollback: str = "auto") -> None:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise InvalidOptionError(f"pid={pid!r} is invalid: expected the pid (int > 0) of the tree's root")
        if mode != "auto" and mode not in MODES:
            raise InvalidOptionError(f"mode={mode!r} is invalid: expected auto or one of {', '.join(MODES)}")
        self.pid = pid
        self.destination = Destination.parse(to)
        self.mode = mode
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise InvalidOptionError("secret must be at least 16 bytes")
        self.secret = secret
        if tls is not None and not isinstance(tls, TLSConfig):
            raise InvalidOptionError("tls must be a TLSConfig(cert, key, ca)")
        self.tls = tls
        if self.destination.needs_credentials and secret is None and tls is None:
            raise InvalidOptionError("tcp:// needs authentication: pass secret=... or tls=TLSConfig(...)")
        if isinstance(ssh_options, str) or not all(isinstance(o, str) for o in ssh_options):
            raise InvalidOptionError("ssh_options must be a list of strings")
        self.ssh_options = tuple(ssh_options)
        self.identity_file = os.fspath(identity_file) if identity_file is not None else None
        if agent_command is not None and (isinstance(agent_command, str) or not agent_command):
            raise InvalidOptionError("agent_command must be a non-empty list of strings")
        self.agent_command = tuple(agent_command) if agent_command is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self.policy = policy or PreCopyPolicy()
        for name, value in (("timeout", timeout), ("lazy_timeout", lazy_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise InvalidOptionError(f"{name}={value!r} is invalid: expected seconds > 0")
        self.timeout = float(timeout)
        self.lazy_timeout = float(lazy_timeout)
        self.source_address = source_address
        self.relay = relay
        self.progress = progress
        self.criu = criu
        flags = dict(flags or {})
        for key, value in flags.items():
            if key not in RESTORE_FLAGS or not isinstance(value, bool):
                raise InvalidOptionError(f"flag {key!r} is not supported: use booleans among {sorted(RESTORE_FLAGS)}")
        self.flags = flags
        self.dump_extra = _dump_extra(pid, dump_options)
        if criu_tls is not None and not isinstance(criu_tls, bool):
            raise InvalidOptionError("criu_tls must be True, False or None (the default: on unless to='local')")
        self.criu_tls = self.destination.pages_leave_host if criu_tls is None else criu_tls
        if not isinstance(insecure_plaintext, bool):
            raise InvalidOptionError("insecure_plaintext must be True or False")
        if insecure_plaintext and (not self.destination.needs_credentials or tls is not None or secret is None):
            raise InvalidOptionError("insecure_plaintext is only for tcp:// with a shared secret and no tls",
                                     hint="drop it: ssh:// and local are encrypted or never leave this host, "
                                          "and tls=TLSConfig(...) always encrypts")
        self.insecure_plaintext = insecure_plaintext
        if keep_logs is not None and not isinstance(keep_logs, bool):
            raise InvalidOptionError("keep_logs must be True, False or None (the default: kept with log_dir or "
                                     "after a failure)")
        self.keep_logs = keep_logs
        if container is not None and not isinstance(container, ContainerOptions):
            raise InvalidOptionError("container must be a pycriu.containers.ContainerOptions")
        if runtime is not None and (container is None or not isinstance(runtime, RuncTarget)):
            raise InvalidOptionError("runtime must be a pycriu.containers.RuncTarget, given with container=")
        if container is not None:
            for key, value in flags.items():
                if getattr(container, key, None) not in (None, value):
                    raise InvalidOptionError(f"flag {key}={value} contradicts the container's {key}")
        self.container = container
        self.runtime = runtime
        if same_host_rollback not in SAME_HOST_ROLLBACKS:
            raise InvalidOptionError(f"same_host_rollback={same_host_rollback!r} is invalid: expected one of "
                                     f"{', '.join(SAME_HOST_ROLLBACKS)}")
        if same_host_rollback != "auto" and not self.destination.same_host:
            raise InvalidOptionError(f"same_host_rollback={same_host_rollback!r} applies only to a migration on "
                                     f"this host (to='local'), not to {self.destination}",
                                     hint="between two hosts the rollback is always the stopped source; drop it")
        self.same_host_rollback = same_host_rollback
        #: what crosses to the agent in the hello (refuses the source's own fds now)
        self.container_hello = containers.hello_field(container, runtime)

    def __repr__(self) -> str:
        return f"Migration(pid={self.pid}, to={str(self.destination)!r}, mode={self.mode!r})"

    def run(self) -> MigrationReport:
        """Migrate; return the report, or raise :class:`MigrationError` (with ``.report``)."""
        return MigrationRun(self).execute()

    def sample_dirty_rate(self, seconds: float = 2.0, bandwidth: float = 125e6) -> DirtySample:
        """How fast the tree rewrites memory, and the flows that fit it: two dumps of the tree
        that leave it running, ``seconds`` apart, compared page by page
        (:func:`pycriu.migration.sampling.sample_dirty_rate`; ``bandwidth``: the link's bytes/s)."""
        from .sampling import sample_dirty_rate

        return sample_dirty_rate(self.pid, seconds, criu=self.criu, flags=dict(self.flags),
                                 container=self.container, bandwidth=bandwidth, scratch=self.scratch_dir)

    def dry_run(self) -> MigrationReport:
        """Everything a migration does before the freeze, and nothing after: both hosts'
        checks, the agent's handshake, the mode ``auto`` would pick, and the pre-flight (the
        destination has the files, ports and paths the tree needs). Returns the report
        (``outcome="checked"``, ``mode`` and ``mode_reason`` say what would run), or raises what
        :meth:`run` would raise before freezing (:class:`PreflightError` naming each problem)."""
        return MigrationRun(self).execute(dry_run=True)


class MigrationRun:
    """The state of one :meth:`Migration.run`; the flows drive it."""

    def __init__(self, m: Migration) -> None:
        self.m = m
        self.pid = m.pid
        self.report = MigrationReport(mode=m.mode, requested_mode=m.mode, destination=str(m.destination),
                                      transport=m.destination.transport(m.tls is not None, m.insecure_plaintext),
                                      pid=m.pid)
        self.clock = PhaseClock(self.report, m.progress)
        self.t0 = self.clock.t0
        self.criu = m.criu or Criu()
        self.conn: Connection | None = None
        self.client: AgentClient | None = None
        self.scratch: Path | None = None
        self.images: Path | None = None
        self.page_tls: pagetls.PageTLS | None = None
        self.tls_dir: Path | None = None
        self.authority: Future[pagetls.Authority] | None = None
        self.log_dir: Path | None = None
        self.src_logs: Path | None = None
        self.t_freeze: float | None = None
        self.t_resume: float | None = None
        self.custody = Custody(ProcTree(m.pid, self._restore_source, lambda: self.images), AgentCopy(self), self.note)
        self.source_comm = procs.comm(m.pid)  # what a restored copy of the tree is called
        #: files of the source's images that arrived by hard link (the page-server flow's pages, taken
        #: back on one host): the destination wrote them, the source's disk figures leave them out
        self.linked_in: set[tuple[int, int]] = set()
        self.dump_result: DumpResult | None = None
        self.page_bytes = 0
        self.released = DirUsage()  # page images removed from the scratch directory once sent
        self.link_images = False  # a local agent takes whole images by hard link (same filesystem)
        self.cancel = threading.Event()  # set when the main thread gives up (Ctrl-C) during a lazy dump
        self.local: dict[str, Any] = {}
        self.source_address = "127.0.0.1"
        self.cleanups: list[Callable[[], object]] = []

    # -- what the flows read of the migration's settings (flows.base.FlowContext) ------------------

    @property
    def rollback_from_images(self) -> bool:
        """One host, and the dump ends the source: its images are the rollback (:mod:`.rollback`;
        custody holds the one flag, set by the handshake)."""
        return self.custody.ends_at_dump

    @property
    def timeout(self) -> float:
        return self.m.timeout

    @property
    def lazy_timeout(self) -> float:
        return self.m.lazy_timeout

    @property
    def policy(self) -> PreCopyPolicy:
        return self.m.policy

    @property
    def flags(self) -> dict[str, bool]:
        return self.m.flags

    @property
    def progress_wanted(self) -> bool:
        """Someone displays progress: worth sampling what only the kernel sees (CRIU's page bytes)."""
        return self.m.progress is not None

    # -- progress and phases ---------------------------------------------------------------------

    def emit(self, phase: str, event: str, **kw: Any) -> None:
        self.clock.emit(phase, event, **kw)

    def phase_start(self, name: str) -> None:
        self.clock.start(name)

    def phase_end(self, name: str, detail: str = "") -> float:
        return self.clock.end(name, detail)

    def phase(self, name: str, detail: str = "") -> AbstractContextManager[None]:
        return self.clock.phase(name, detail)

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    # -- the whole run ---------------------------------------------------------------------------

    def execute(self, *, dry_run: bool = False) -> MigrationReport:
        error: BaseException | None = None
        # the image reader (protobuf and CRIU's schema, 40 ms) reads the dump's statistics right
        # after the freeze: loaded beside the checks, not inside the downtime
        threading.Thread(target=importlib.import_module, args=("pycriu.images",), daemon=True,
                         name="pycriu-images-import").start()
        # CRIU's breakpoints (the dump's and, on one host, the restore's) cost nothing once the
        # kernel's perf hooks are on: switched on beside the checks (pycriu.breakpoints)
        warm = breakpoints.Warm().open_in_background()
        try:
            self._prepare_dirs()
            with self.phase("checks"):
                mode = handshake.checks_and_handshake(self)
            self.report.mode = mode
            if dry_run:
                self.custody.checked()
                return self.report
            self._prepare_scratch(mode)
            warm.wait()  # on before the freeze, whatever kept the checks short
            self.emit("mode", "info", message=f"{mode}: {self.report.mode_reason}")
            result = FLOWS[mode].load().run(self)
            self.custody.succeeded()
            self.report.pages = result.pages
            self.page_bytes = result.page_bytes
        except BaseException as exc:  # noqa: BLE001 - re-raised below with the report
            error = exc
            self._on_failure(exc)
        finally:
            try:
                interrupted = teardown.finish(self, error)
            finally:
                warm.close()
        error = error or interrupted  # a Ctrl-C during the teardown, raised with the finished report
        if error is not None:
            raise teardown.final_error(self, error)
        return self.report

    def _prepare_dirs(self) -> None:
        if self.m.log_dir is not None:
            self.m.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"migration-{self.pid}-", dir=self.m.log_dir))
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"pycriu-migration-{self.pid}-"))
        self.report.log_dir = str(self.log_dir)
        self.src_logs = self.log_dir / "source"
        self.src_logs.mkdir()

    def _prepare_scratch(self, mode: str) -> None:
        """The source's images directory: ``scratch_dir`` if given; for the lazy flows, whose
        images hold only CRIU's few non-lazy pages, a memory filesystem when there is one (so
        that no page touches a disk); else the temporary directory."""
        where = self.m.scratch_dir
        if where is None and FLOWS[mode].source_images_in_memory:
            where = memory_dir()
            if where is None:
                self.note("no memory filesystem with room at /dev/shm: the source's non-lazy pages are written "
                          "to the temporary directory's disk")
        self.scratch = Path(tempfile.mkdtemp(prefix=f"pycriu-migrate-{self.pid}-", dir=where))
        self.images = self.scratch / "images"
        self.images.mkdir()
        # A local agent whose images directory is on this filesystem takes whole images by hard
        # link: on one host a copy only costs time and memory (a second page cache, in the downtime).
        link_dev = self.client.info.get("link_dev") if self.client and self.m.destination.same_host else None
        if links_reach(self.images, link_dev):
            self.link_images = True
            self.note("images by hard link to the local agent (same host and filesystem): no copy")


    def _restore_source(self) -> int:
        """The rollback on one host: restore the source from its own images (its new root pid)."""
        assert self.images is not None and self.src_logs is not None
        flags: dict[str, Any] = dict(self.m.flags)
        result = self.criu.restore(RestoreOptions(images_dir=self.images, work_dir=self.src_logs,
                                                  log_file="rollback-restore.log", log_level=LogLevel.INFO, **flags))
        self.report.logs["source rollback-restore"] = str(result.log_path)
        return result.pid


    # -- building blocks for the flows -----------------------------------------------------------

    def relay(self, address: PageServerAddress) -> PageServerAddress:
        return self.m.relay(address) if self.m.relay is not None else address

    def criu_tls_options(self) -> dict[str, Any]:
        """CRIU's TLS options for this side's page connections (empty without ``criu_tls``):
        the user's certificates, or this migration's own (:mod:`.pagetls`)."""
        if self.page_tls is not None:
            return self.page_tls.criu_options()
        tls = self.m.tls
        if not self.m.criu_tls or tls is None:
            return {}
        return tls.criu_options()

    def dump_options(self, **kw: Any) -> DumpOptions:
        assert self.images is not None and self.src_logs is not None
        kw.setdefault("images_dir", self.images)
        kw.setdefault("log_file", "dump.log")
        if kw.get("page_server") is not None or kw.get("lazy_pages"):
            kw.update(self.criu_tls_options())
        # A flow keeps the source stopped, not killed, when post-dump answers success: it is
        # killed only once the destination acknowledged the commit (custody.py). (On one host a
        # flow whose rollback is the source's images asks for leave_stopped=False: rollback.py.)
        kw.setdefault("leave_stopped", True)
        flags: dict[str, Any] = {**self.m.flags, **self.m.dump_extra}
        if self.m.container is not None:
            return self.m.container.dump_options(pid=self.pid, work_dir=self.src_logs, log_level=LogLevel.INFO,
                                                 **flags, **kw)
        return DumpOptions(pid=self.pid, work_dir=self.src_logs, log_level=LogLevel.INFO, **flags, **kw)

    def notify(self, post_dump: Callable[[], None] | None) -> Callable[[str, int], bool]:
        """A dump's notify callback (:meth:`Custody.criu_notify`): marks the freeze and runs
        ``post_dump`` at CRIU's post-dump point, unless the caller gave up meanwhile."""

        def freeze() -> None:
            self.t_freeze = time.monotonic()
            self.phase_start("freeze+dump")

        def post() -> None:
            self.check_cancelled()
            if post_dump is not None:
                post_dump()

        def dumped() -> None:
            self.phase_end("freeze+dump")

        return self.custody.criu_notify(post, on_freeze=freeze, on_dumped=dumped)

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise MigrationError("cancelled by the caller (KeyboardInterrupt)")

    def record_dump(self, result: DumpResult, label: str = "dump", *, stats: bool = True) -> None:
        self.dump_result = result
        if result.stats is not None and stats:
            self.report.criu_stats[label] = result.stats.to_dict()
        self.report.logs[f"source {label}"] = str(result.log_path)

    def send_images(self, name: str, files: Sequence[tuple[str, Path, list[tuple[int, int]] | None]],
                    detail: str = "", lazy_daemon: PageServerAddress | None = None) -> int:
        return transfer.send_images(self, name, files, detail, lazy_daemon)

    def release_source_pages(self) -> None:
        transfer.release_source_pages(self)

    def restore_and_commit(self, *, lazy: bool, page_server: PageServerAddress | None, name: str = "images") -> None:
        handover.restore_and_commit(self, lazy=lazy, page_server=page_server, name=name)

    def dump_stats(self) -> DumpStats | None:
        return self.dump_result.stats if self.dump_result is not None else None

    # -- failure and the end ---------------------------------------------------------------------

    def _on_failure(self, exc: BaseException) -> None:
        self.report.error = teardown.describe(exc)
        # a rollback once begun is finished: a second Ctrl-C in the agent's abort or in the
        # restore from the source's images would leave neither copy (and the images deleted)
        with interrupts_held() as again:
            self.custody.fail(self.report.error)
        if again:
            self.note("Ctrl-C again during the rollback: it was finished first")


class AgentCopy:
    """The destination's copy, reached through the run's agent (:class:`DestinationCopy`)."""

    def __init__(self, run: MigrationRun) -> None:
        self.run = run

    def abort(self, reason: str) -> str:
        run, state = self.run, self.run.custody.destination_state
        if run.client is None:
            return state
        reply = run.client.abort(reason)  # only the first call talks to the agent
        if reply is not None:
            return "killed" if reply["killed"] else state
        if run.custody.destination_pid is not None:
            return self._drop(run.custody.destination_pid, state)
        return state if state == "none" else "unknown (the agent kills an uncommitted tree when the link drops)"

    def _drop(self, pid: int, state: str) -> str:
        """The agent cannot be told to abort after it restored (the link is lost): its tree was
        never resumed. The agent kills it (its guard, if the agent died); on this host
        (``local``) the source also kills it itself if it is still there."""
        run = self.run
        if state.startswith(("killed", "gone")):
            return state
        if not run.m.destination.same_host:
            run.note(f"the agent could not be told to abort: its restored tree (pid {pid} on the destination) "
                     "was never resumed; the agent kills it when it notices the lost link (or after its "
                     "--commit-timeout), and its guard does if the agent died")
            return STOPPED_UNCOMMITTED
        found = procs.tree_state(pid)
        if found == "gone":
            return "gone"
        if found == "stopped" and run.source_comm is not None and procs.comm(pid) == run.source_comm:
            # (not the command line: it is read from the process's memory, which a lazily
            # restored tree may not have yet; and the source's name from before the freeze: a
            # dump that ended the source leaves nothing to read it from)
            procs.kill_tree(pid)
            procs.wait_gone(pid)
            run.note(f"the agent could not be told to abort: the source killed the destination's stopped, "
                     f"uncommitted tree (pid {pid}, same host) itself")
            return "killed"
        run.note(f"the agent could not be told to abort and pid {pid} no longer looks like the restored tree: "
                 "left alone")
        return "unknown (the agent was unreachable)"
