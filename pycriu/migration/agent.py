"""The destination agent: ``pycriu agent`` (or ``python -m pycriu.migration.agent``).

One agent session receives a migrating process tree: it checks CRIU here, runs CRIU's page server
or lazy-pages daemon when the flow needs one, receives the non-page images into a private session
directory, restores the tree, and keeps it only once the source commits. Everything it receives
is validated (:mod:`pycriu.migration.protocol`); any violation ends the session.

Modes:

* ``--stdio``: one session over stdin/stdout (the ``local`` and ``ssh://`` transports). The
  original stdout is taken over for the protocol; anything else printing to stdout goes to stderr.
* ``--listen HOST:PORT``: sessions one after another over TCP (``tcp://``), on 127.0.0.1 unless
  told otherwise, authenticated by TLS client certificates (``--tls-cert/--tls-key/--tls-ca``)
  and/or a shared secret (``--secret-file``). Without either the agent refuses to start.

What the agent guarantees, whatever happens to the connection:

* a restored tree is held stopped (CRIU's ``leave_stopped``) and resumed (``SIGCONT`` to every
  process) only when the source commits, just before the agent acknowledges: never a second
  running copy. An agent that dies before the commit takes its tree with it: the session's guard
  (:mod:`pycriu.migration.guard`, a process of its own) kills it when the agent's pipe closes;
* a restored tree that the source has not committed is killed (the source resumes its own);
* a lazily restored tree whose lazy-pages daemon fails is killed at once (its missing pages
  would otherwise read as zeros), and the failure is reported;
* page servers, lazy-pages daemons and the session directory are removed (the logs of a failed
  session are kept and named in the agent's stderr).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from .agent_config import RESTORE_FLAGS, AgentConfig
from .agent_server import serve_stdio, serve_tcp
from .agent_session import AgentSession
from .procs import kill_tree
from .transport import TLSConfig

__all__ = ["AgentConfig", "AgentSession", "serve_stdio", "serve_tcp", "main", "add_arguments", "run_from_args",
           "RESTORE_FLAGS", "kill_tree"]

log = logging.getLogger("pycriu.agent")


# --- Command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, criu_option: bool = True) -> None:
    """The ``pycriu agent`` options (shared by the CLI and ``python -m pycriu.migration.agent``);
    ``criu_option=False`` when the parser already has a ``--criu``."""
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout (local, ssh://)")
    how.add_argument("--listen", metavar="HOST:PORT", help="serve sessions over TCP (tcp://); HOST defaults to "
                                                           "127.0.0.1, PORT 0 picks a free one")
    parser.add_argument("--root", metavar="DIR", help="directory for session data (default: a new temporary one)")
    parser.add_argument("--secret-file", metavar="FILE", help="shared secret for tcp:// clients (the control "
                                                              "channel then runs over TLS bound to it)")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="with --secret-file and no TLS certificates: serve the control channel WITHOUT "
                             "encryption (authenticated and MAC'd only; in classic mode the process's memory "
                             "is readable by anyone on the path)")
    TLSConfig.add_arguments(parser, own="this agent's", ca="CA that signs accepted client certificates")
    parser.add_argument("--data-address", metavar="IP", help="address CRIU's page servers listen on "
                                                             "(default: the address the source reached)")
    parser.add_argument("--once", action="store_true", help="with --listen: exit after one session")
    parser.add_argument("--same-host", action="store_true",
                        help="with --stdio, for an agent the source starts on its own host (the local "
                             "transport does): accept whole images by hard link instead of by copy")
    parser.add_argument("--images-on-disk", action="store_true",
                        help="keep the lazy flows' images under --root too (default: in /dev/shm, a tmpfs, so "
                             "that no page touches a disk)")
    if criu_option:
        parser.add_argument("--criu", metavar="PATH", help="criu binary")
    parser.add_argument("--commit-timeout", type=float, default=120.0, metavar="S",
                        help="kill a restored tree the source has not committed after S seconds")
    parser.add_argument("--max-file-size", type=int, default=64 << 30, metavar="BYTES",
                        help="largest image file accepted")
    parser.add_argument("--max-files", type=int, default=100_000, metavar="N",
                        help="most image files accepted in one session")
    parser.add_argument("--page-server-from", action="append", default=[], metavar="IP",
                        help="also accept a source page server at IP (default: only the source's own address)")
    parser.add_argument("--container-path", action="append", default=[], metavar="DIR",
                        help="a container migration may name paths under DIR (bundles, rootfs, mount sources)")
    parser.add_argument("--container-cgroup", action="append", default=[], metavar="PATH",
                        help="a container migration may restore cgroups under PATH")
    parser.add_argument("--container-veth", action="append", default=[], metavar="NAME",
                        help="a container migration may create the host end NAME of a veth pair")
    parser.add_argument("--runc", nargs="?", const="runc", metavar="PATH",
                        help="restore runc containers with runc (PATH, default: runc on PATH)")
    parser.add_argument("-v", "--verbose", action="store_true")


def read_secret(path: str) -> bytes:
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise InvalidOptionError(f"the secret in {path} is too short: use at least 16 bytes "
                                 "(for example `head -c 32 /dev/urandom | base64 > FILE`)")
    return data


def run_from_args(args: argparse.Namespace) -> int:
    """Run an agent from parsed :func:`add_arguments` options; returns the exit status."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="pycriu-agent[%(process)d] %(levelname)s %(message)s")
    try:
        tls = TLSConfig.from_args(args)
    except InvalidOptionError as exc:
        print(f"pycriu agent: {exc}", file=sys.stderr)
        return 2
    if args.insecure_plaintext and (tls is not None or not args.secret_file or args.stdio):
        print("pycriu agent: --insecure-plaintext is for --listen with --secret-file and no TLS certificates",
              file=sys.stderr)
        return 2
    if args.same_host and not args.stdio:
        print("pycriu agent: --same-host is for --stdio (an agent the source starts on its own host)",
              file=sys.stderr)
        return 2
    own_root = args.root is None
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="pycriu-agent-"))
    config = AgentConfig(root=root, memory_images=not args.images_on_disk, same_host=args.same_host,
                         secret=read_secret(args.secret_file) if args.secret_file else None, tls=tls,
                         insecure_plaintext=args.insecure_plaintext,
                         data_address=args.data_address, criu_binary=getattr(args, "criu", None),
                         commit_timeout=args.commit_timeout,
                         max_file_size=args.max_file_size, max_files=args.max_files,
                         page_server_addresses=tuple(args.page_server_from),
                         container_paths=tuple(Path(p) for p in args.container_path),
                         container_cgroups=tuple(args.container_cgroup),
                         container_interfaces=tuple(args.container_veth), runc=args.runc)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.stdio:
            return serve_stdio(config)
        host, _, port = args.listen.rpartition(":")
        return serve_tcp(config, host.strip("[]") or "127.0.0.1", int(port or 0), once=args.once)
    except InvalidOptionError as exc:
        print(f"pycriu agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if own_root:
            try:
                root.rmdir()  # only when empty: the logs of failed sessions stay
            except OSError:
                log.warning("kept %s (logs of failed sessions)", root)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pycriu agent", description="Destination agent of pycriu migrations.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown (20-30 ms that the source waits for): every
    session resource was released by its owner already; flush what is buffered first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    _exit_now(main())
