"""Everything a migration knows before it freezes anything: this host's checks, reaching the
agent and its ``hello``, this migration's page TLS, the flow to run (and, on one host, its
rollback and what the tree's host-wide names allow: :mod:`.rollback`), and the pre-flight. Ends
in the mode, or raises."""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._threads import spawn
from ..errors import KernelUnsupportedError, NoSuchProcessError
from . import checks, containers, pagetls, preflight, procs, rollback
from .client import AgentClient
from .errors import AgentError, PreflightError
from .images import links_reach, memory_dir
from .modes import NEEDS_LAZY, NEEDS_MEM_TRACK, NO_MEM_TRACK, choose_mode
from .transport import connect

if TYPE_CHECKING:
    from .runstate import RunState

__all__ = ["checks_and_handshake", "require_source_features"]


def checks_and_handshake(run: RunState) -> str:
    """Everything that can be known before freezing: returns the mode to run."""
    m = run.m
    if os.geteuid() != 0:
        from ..errors import CriuPermissionError

        raise CriuPermissionError("migration needs root on the source (CRIU dump)", operation="migrate")
    if procs.tree_state(run.pid) == "gone":
        raise NoSuchProcessError(f"no process with pid {run.pid} to migrate", operation="migrate")
    # This host's checks run while the agent is reached (and, there, probes its own CRIU):
    # both sides are verified before anything is frozen, concurrently.
    # A mode that needs a feature waits for this host's answer first (from the cache, a few
    # ms), so that a source lacking it is refused before any agent is started.
    probe = spawn(checks.probe, run.criu, name="pycriu-source-checks")
    # this CPU for the agent's ``criu cpuinfo check`` (one host: the same CPU, nothing to check)
    cpu = None if m.destination.same_host else spawn(preflight.cpuinfo_image, run.criu.binary,
                                                      name="pycriu-cpuinfo")
    own_tls = m.criu_tls and m.tls is None  # this migration's own certificates for CRIU's pages
    authority = None
    if own_tls:  # the directory is made here, so that the end of the run removes it on every path
        run.tls_dir = Path(tempfile.mkdtemp(prefix=f"pycriu-migrate-tls-{run.pid}-", dir=memory_dir()))
        authority = run.authority = spawn(_page_tls_authority, run, run.tls_dir, name="pycriu-page-tls-ca")
    if m.mode in NEEDS_MEM_TRACK or m.mode in NEEDS_LAZY:
        require_source_features(run, probe.result())
    try:
        run.conn = connect(m.destination, secret=m.secret, tls=m.tls, insecure_plaintext=m.insecure_plaintext,
                            ssh_options=m.ssh_options,
                            identity_file=m.identity_file, agent_command=m.agent_command,
                            stderr_path=run.log_dir / "agent.log" if run.log_dir else None,
                            timeout=m.timeout)
    finally:
        host = probe.result()  # the source's own failure first: it is the more basic one
    features = host
    run.local = {"pycriu": __version__, "criu": host.criu, "arch": platform.machine(),
                  "kernel": platform.release(),
                  "features": {"lazy_pages": features.lazy_pages, "mem_track": features.mem_track}}
    run.report.versions["source"] = dict(run.local)
    run.note(f"source checks took {host.seconds * 1000:.0f} ms"
              + (" (criu check and features cached for this boot; version asked now)" if host.cached else ""))
    requested = m.mode
    require_source_features(run, host)
    run.report.transport = run.conn.transport
    run.client = AgentClient(run.conn, timeout=m.timeout)
    remote = run.client.hello(run.local, requested, page_tls=authority is not None,
                               container=m.container_hello)
    if authority is not None:
        ca = authority.result()
        if not remote.get("tls_csr"):
            raise AgentError("the agent did not send a certificate request for CRIU's page connections "
                             "(an older agent?); pass criu_tls=False to send the pages in the clear",
                             code="incompatible")
        run.client.page_tls(ca.sign(remote["tls_csr"]), ca.ca_pem)
    run.report.versions["destination"] = {k: remote[k] for k in ("pycriu", "criu", "arch", "kernel", "features")}
    if not remote.get("criu_check"):
        raise AgentError(f"CRIU does not work on the destination: {remote.get('criu_error')}", code="incompatible")
    older = checks.older_destination(run.local["criu"], remote["criu"])
    if older is not None:
        raise AgentError(older, code="incompatible")
    run.client.ping()
    run.source_address = _source_address(run, remote)
    mode, reason = choose_mode(requested, features.lazy_pages, features.mem_track,
                                remote["features"]["lazy_pages"], remote["features"]["mem_track"])
    resources = procs.tree_resources(run.pid)
    if m.container is not None:
        resources = containers.preflight_resources(resources)
    if m.destination.same_host:
        mode, reason = _same_host_rollback(run, requested, mode, reason,
                                           resources.host_names() + _pids_held(run.pid, remote.get("pid_ns")))
    else:
        run.report.rollback_plan = rollback.STOPPED_SOURCE
    problems = run.client.preflight(preflight.request(resources, cpu.result() if cpu is not None else None))
    if problems:
        raise PreflightError(f"the destination cannot restore this tree: {'; '.join(problems)}",
                             resources=tuple(problems),
                             hint="make the destination provide these (the same files, free ports), or choose "
                                  "another destination; nothing was frozen")
    run.note(f"pre-flight: the destination has the {len(resources.files)} files, "
             f"{len(resources.tcp_ports)} listening ports and {len(resources.unix_paths)} socket paths "
             "the tree needs" + (" and a CPU that offers what this one gives it (criu cpuinfo check)"
                                 if cpu is not None and cpu.result() is not None else ""))
    run.report.mode_reason = reason
    return mode


def _same_host_rollback(run: RunState, requested: str, mode: str, reason: str, names: list[str]) -> tuple[str, str]:
    """On one host: the stopped source or its images as the rollback (:mod:`.rollback`), and the
    flow that can give it. Ends in the mode, or raises :class:`PreflightError`."""
    choice = rollback.choose(run.m.same_host_rollback, requested, mode, reason, names,
                             container=run.m.container is not None, links=_links(run),
                             remaps=bool(run.m.flags.get("link_remap")))
    run.custody.ends_at_dump = choice.from_images
    run.report.rollback_plan = choice.plan
    if choice.note:
        run.note(choice.note)
    return choice.mode, choice.mode_reason


def _links(run: RunState) -> bool:
    """The local agent's images are on the filesystem the source's will be on (hard links work;
    a page-server flow's scratch: ``scratch_dir``, else the temporary directory)."""
    assert run.client is not None
    return links_reach(run.m.scratch_dir or tempfile.gettempdir(), run.client.info.get("link_dev"))


def _pids_held(pid: int, destination_ns: int | None) -> list[str]:
    """A tree in the destination's own PID namespace is restored under its own PIDs, which a
    stopped source still holds ("Can't fork for PID: File exists"). An agent that does not say
    its namespace (an older one) shares this host's."""
    ns = procs.pid_namespace(pid)
    if ns is None or ns != (destination_ns if destination_ns is not None else procs.pid_namespace()):
        return []
    return [f"its PIDs (from {pid}) in the destination's PID namespace"]


def _page_tls_authority(run: RunState, directory: Path) -> pagetls.Authority:
    """This migration's CA, and the source's own certificate from it in ``directory`` (0700,
    removed at the end, in tmpfs when there is one)."""
    ca = pagetls.Authority()
    run.page_tls = ca.issue_local(directory)
    return ca


def require_source_features(run: RunState, host: checks.HostCheck) -> None:
    requested = run.m.mode
    if requested in NEEDS_MEM_TRACK and not host.mem_track:
        raise KernelUnsupportedError(f"{requested} migration needs dirty-memory tracking on the source: "
                                     f"{NO_MEM_TRACK}", operation="migrate",
                                     hint="use mode='lazy', 'page-server' or 'classic'")
    if requested in NEEDS_LAZY and not host.lazy_pages:
        raise KernelUnsupportedError(f"{requested} migration needs lazy pages (userfaultfd) on the source",
                                     operation="migrate", hint="use mode='page-server' or 'classic'")


def _source_address(run: RunState, remote: Mapping[str, Any]) -> str:
    if run.m.source_address:
        return run.m.source_address
    if run.m.destination.same_host:
        return "127.0.0.1"
    seen = remote.get("peer_address")
    if isinstance(seen, str) and seen and _is_local_address(seen):
        return seen
    assert run.m.destination.host is not None
    return run.conn.local_address if run.conn and run.conn.local_address and run.m.destination.has_own_address \
        else procs.address_towards(run.m.destination.host)


def _is_local_address(address: str) -> bool:
    import socket

    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False
