"""``pycriu agent`` and ``pycriu migrate``: :func:`register` adds them to the ``pycriu`` command;
``python -m pycriu.migration.cli`` runs them on their own.

::

    pycriu agent --listen 0.0.0.0:7000 --tls-cert agent.pem --tls-key agent.key --tls-ca ca.pem
    pycriu migrate 1234 --to tcp://dst:7000 --mode lazy --tls-cert src.pem --tls-key src.key --tls-ca ca.pem
    pycriu migrate 1234 --to ssh://root@dst --mode auto

``migrate`` shows each phase as it happens when standard error is a terminal, prints the report
(``--json``: as JSON) and exits 0 when the process moved, 1 when it did not (the report says where
it runs), 2 on bad usage, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..errors import CriuError, InvalidOptionError
from . import agent as agent_mod
from .migration import MODES, Migration, Progress
from .phases import RateMeter
from .policy import PreCopyPolicy
from .report import MigrationReport
from .rollback import SAME_HOST_ROLLBACKS
from .transport import TLSConfig

__all__ = ["register", "main", "ProgressDisplay", "cmd_agent", "cmd_migrate"]


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)  # noqa: SLF001


def register(subparsers: Any) -> None:
    """Add the ``agent`` and ``migrate`` subcommands (each with a ``func(args) -> int`` default)."""
    p = subparsers.add_parser("agent", help="run the destination agent of migrations",
                              description="Receive migrating process trees (see `pycriu migrate`).")
    agent_mod.add_arguments(p, criu_option=not _has_option(p, "--criu"))
    p.set_defaults(func=cmd_agent)

    p = subparsers.add_parser("migrate", help="move a live process tree to another host",
                              description="Migrate the tree rooted at PID to a destination agent.")
    p.add_argument("pid", type=int, metavar="PID", help="root of the tree to migrate")
    ct = p.add_argument_group("containers (docs/containers.rst)")
    ct.add_argument("--container", metavar="FILE",
                    help="the tree is a container: its ContainerOptions as JSON (`pycriu container options`)")
    ct.add_argument("--runc-bundle", metavar="DIR", help="restore with runc from this bundle on the destination")
    ct.add_argument("--runc-id", metavar="ID", help="the container's id on the destination")
    ct.add_argument("--runc-root", metavar="DIR", help="runc's state directory on the destination")
    p.add_argument("--to", default="local", metavar="DEST",
                   help="local (default), ssh://[user@]host[:port] or tcp://host:port")
    p.add_argument("--mode", default="auto", choices=["auto", *MODES],
                   help="memory-transfer flow (default auto: lazy when both hosts support it, else pre-copy when "
                        "both track dirty memory, else page-server)")
    p.add_argument("--same-host-rollback", default="auto", choices=list(SAME_HOST_ROLLBACKS),
                   help="--to local: what a failure brings the source back from: its images (the dump ends it, "
                        "as criu dump does: no second copy of its memory) or the stopped source; default auto: "
                        "the images in classic, page-server and page-server-on-source, the stopped source in "
                        "lazy, pre-copy and hybrid and for containers; a tree holding ports, socket paths, FIFOs, "
                        "locks or its PIDs needs the images (lazy then runs as page-server-on-source, pre-copy "
                        "and hybrid are refused)")
    auth = p.add_argument_group("tcp:// authentication")
    auth.add_argument("--secret-file", metavar="FILE", help="shared secret (the agent's --secret-file)")
    TLSConfig.add_arguments(auth, own="this host's", ca="CA that signed the agent's certificate")
    auth.add_argument("--insecure-plaintext", action="store_true",
                      help="with --secret-file: talk to an agent started with --insecure-plaintext WITHOUT TLS "
                           "(the control channel, in classic mode the process's memory, readable on the path)")
    auth.add_argument("--no-criu-tls", action="store_true",
                      help="send the pages over CRIU's own connections in the clear (default: TLS for ssh:// and "
                           "tcp://, with --tls-* certificates or one-migration ones)")
    ssh = p.add_argument_group("ssh://")
    ssh.add_argument("-i", "--identity", metavar="FILE", help="SSH private key")
    ssh.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                     help="extra ssh argument, e.g. --ssh-option=-oPort=2222 (repeatable)")
    ssh.add_argument("--agent-command", metavar="CMD",
                     help="agent command on the destination (default: pycriu agent --stdio)")
    p.add_argument("--log-dir", metavar="DIR", help="keep the CRIU logs of both sides here")
    p.add_argument("--timeline", metavar="FILE.svg",
                   help="write the migration's timeline (both hosts' phases, the downtime) as an SVG picture")
    p.add_argument("--scratch-dir", metavar="DIR", help="where the source writes its images")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="wait at most S s for any agent reply")
    p.add_argument("--lazy-timeout", type=float, default=600.0, metavar="S",
                   help="lazy flows: the page transfer may take S s")
    p.add_argument("--source-address", metavar="IP", help="address of this host the destination connects to")
    p.add_argument("--flag", action="append", default=[], choices=sorted(agent_mod.RESTORE_FLAGS),
                   help="CRIU option for dump and restore (repeatable), e.g. --flag tcp_established")
    pre = p.add_argument_group("pre-copy and hybrid")
    pre.add_argument("--max-iterations", type=int, default=8)
    pre.add_argument("--min-pages", type=int, default=64)
    pre.add_argument("--max-growth", type=float, default=0.10)
    p.add_argument("--dry-run", action="store_true",
                   help="check everything that can be known before the freeze (both hosts, the mode auto would "
                        "pick, the destination's files, ports and socket paths) and stop: nothing is frozen")
    p.add_argument("--sample-dirty", type=float, metavar="S",
                   help="with --dry-run: dump the tree twice, S s apart, leaving it running, and say how fast it "
                        "rewrites memory and which flows fit it (costs two short freezes and two copies of its "
                        "memory for the time of the sample)")
    p.add_argument("--bandwidth", type=float, default=1000.0, metavar="MBIT",
                   help="the link's speed in Mbit/s, for --sample-dirty's advice (default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    if not _has_option(p, "--json"):
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    if not _has_option(p, "--criu"):
        p.add_argument("--criu", metavar="PATH", help="criu binary")
    p.set_defaults(func=cmd_migrate)


def cmd_agent(args: argparse.Namespace) -> int:
    return agent_mod.run_from_args(args)


class ProgressDisplay:
    """Phases as they start and end, and during a transfer its bytes, rate and time left: on a
    terminal one line kept up to date, elsewhere (a log, a pipe) a line every ``every`` s."""

    def __init__(self, stream: IO[str], every: float = 3.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._open = ""
        self._lock = threading.Lock()
        self._last = 0.0
        self._meters: dict[str, RateMeter] = {}

    def __call__(self, e: Progress) -> None:
        with self._lock:
            if e.event == "start":
                self._close_line()
                self._open = e.phase
                self._meters[e.phase] = RateMeter()
                # on a terminal the first figures show at once; in a log, after the first interval
                self._last = e.elapsed - (1.0 if self.tty else 0.0)
                self._write(f"  {e.phase:<22} ..." + ("" if self.tty else "\n"))
            elif e.event == "end":
                self._meters.pop(e.phase, None)
                self._close_line(f"  {e.phase:<22} {(e.seconds or 0) * 1000:8.1f} ms"
                                 + (f"  {e.message}" if e.message else ""))
                self._open = ""
            elif e.event == "bytes" and e.done is not None:
                rate, left = self._meters.setdefault(e.phase, RateMeter()).update(e.elapsed, e.done, e.total)
                if e.elapsed - self._last < (0.1 if self.tty else self.every):
                    return
                self._last = e.elapsed
                figures = self.figures(e.done, e.total, rate, left)
                if self.tty:
                    self._write(f"\r\x1b[K  {e.phase:<22} ... {figures}")
                else:
                    self._write(f"  {e.phase:<22} {figures}\n")
            elif e.event == "info":
                self._close_line(f"  mode: {e.message}")

    @staticmethod
    def figures(done: int, total: int | None, rate: float | None, left: float | None) -> str:
        """``1.0 / 4.0 MiB (25%), 12.0 MiB/s, 0.3 s left``: what is known of a transfer."""
        mib = 2 ** 20
        text = f"{done / mib:.1f}" + (f" / {total / mib:.1f} MiB ({100 * done // total}%)" if total else " MiB")
        if rate is not None:
            text += f", {rate / mib:.1f} MiB/s"
        if left is not None:
            text += f", {left:.1f} s left"
        return text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _close_line(self, text: str | None = None) -> None:
        if text is None:
            if self._open:
                self._write("\n")
            return
        if self._open and self.tty:
            self._write("\r\x1b[K" + text + "\n")
        elif self._open:
            self._write("\n" + text + "\n")
        else:
            self._write(text + "\n")
        self._open = ""


def _migration(args: argparse.Namespace) -> Migration:
    from ..criu import Criu

    secret = None
    if args.secret_file:
        secret = agent_mod.read_secret(args.secret_file)
    tls = TLSConfig.from_args(args)
    progress = None if args.quiet else ProgressDisplay(sys.stderr)
    criu_path = getattr(args, "criu", None)
    container = runtime = None
    if args.container:
        from ..containers import ContainerOptions

        container = ContainerOptions.load(args.container)
    if args.runc_bundle:
        from ..containers import RuncTarget

        runtime = RuncTarget(bundle=args.runc_bundle, id=args.runc_id, root=args.runc_root)
    return Migration(
        args.pid, to=args.to, mode=args.mode, secret=secret, tls=tls, ssh_options=args.ssh_option,
        identity_file=args.identity, agent_command=shlex.split(args.agent_command) if args.agent_command else None,
        log_dir=args.log_dir, scratch_dir=args.scratch_dir, timeout=args.timeout, lazy_timeout=args.lazy_timeout,
        source_address=args.source_address, progress=progress, criu=Criu(criu_path) if criu_path else None,
        flags={name: True for name in args.flag}, criu_tls=False if args.no_criu_tls else None,
        insecure_plaintext=args.insecure_plaintext,
        container=container, runtime=runtime, same_host_rollback=args.same_host_rollback,
        policy=PreCopyPolicy(max_iterations=args.max_iterations, min_pages=args.min_pages,
                             max_growth=args.max_growth))


def _print_report(report: MigrationReport, as_json: bool, timeline: str | None = None) -> None:
    if timeline:  # also after a failure: where the time went is most wanted then
        try:
            Path(timeline).write_text(report.timeline_svg())
        except OSError as exc:
            print(f"pycriu migrate: cannot write the timeline to {timeline}: {exc.strerror}", file=sys.stderr)
    print(report.to_json() if as_json else str(report), flush=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    as_json = bool(getattr(args, "json", False))
    try:
        migration = _migration(args)
        if not args.quiet and sys.stderr.isatty():
            print(f"pycriu migrate: pid {args.pid} -> {args.to}, mode {args.mode}", file=sys.stderr)
        if args.sample_dirty is not None and not args.dry_run:
            raise InvalidOptionError("--sample-dirty goes with --dry-run (it measures; a migration then chooses "
                                     "with --mode)")
        report = migration.dry_run() if args.dry_run else migration.run()
        sample = (migration.sample_dirty_rate(args.sample_dirty, args.bandwidth * 1e6 / 8)
                  if args.sample_dirty is not None else None)
    except InvalidOptionError as exc:
        print(f"pycriu migrate: {exc}", file=sys.stderr)
        return 2
    except (CriuError, KeyboardInterrupt) as exc:
        failed = getattr(exc, "report", None)  # where the process is now, even after a failure
        if failed is not None:
            _print_report(failed, as_json, args.timeline)
        interrupted = isinstance(exc, KeyboardInterrupt)
        print(f"pycriu migrate: {'interrupted' if interrupted else exc}", file=sys.stderr)
        return 130 if interrupted else 1
    if sample is not None and as_json:
        print(json.dumps({**json.loads(report.to_json()), "dirty_sample": sample.to_dict()}, indent=2), flush=True)
    else:
        _print_report(report, as_json, args.timeline)
        if sample is not None:
            print(sample)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pycriu.migration.cli {agent,migrate} ...``."""
    parser = argparse.ArgumentParser(prog="pycriu", description="pycriu migration commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
