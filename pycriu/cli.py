"""The ``pycriu`` command: doctor, dump, restore, page-server, lazy-pages (and migrate, agent).

Option names follow the ``criu`` command line (``-t/--tree``, ``-D/--images-dir``,
``-R/--leave-running``, ``--tcp-established``, ``--lazy-pages``, ``--address``/``--port``, ...), so a
runc or CRIU user finds them familiar. Errors print CRIU's own message, the log and a hint, and
exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._argparse import SubcommandParser
from .criu import Criu, find_criu
from .errors import CriuError, InvalidOptionError
from .options import (
    DumpOptions,
    InheritFd,
    LazyPagesOptions,
    PageServerAddress,
    PageServerOptions,
    RestoreOptions,
)

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser, *, images_required: bool = True) -> None:
    p.add_argument("-D", "--images-dir", required=images_required, metavar="DIR",
                   help="directory of the image files")
    p.add_argument("-W", "--work-dir", metavar="DIR", help="directory for logs and stats (default: images dir)")
    p.add_argument("-o", "--log-file", metavar="FILE", help="log file name inside the work dir")
    p.add_argument("-v", dest="log_level", type=int, choices=range(0, 5), metavar="N",
                   help="log verbosity 0-4 (like criu -vN)")


def _criu_flags(p: argparse.ArgumentParser) -> None:
    for flag, help_text in (
        ("--tcp-established", "checkpoint/restore established TCP connections"),
        ("--tcp-close", "close established TCP connections on restore"),
        ("-j/--shell-job", "the tree was started from a shell (has a controlling terminal)"),
        ("-x/--ext-unix-sk", "allow external unix sockets"),
        ("--file-locks", "handle file locks"),
        ("--link-remap", "allow link-remap of unlinked files"),
        ("--manage-cgroups", "dump/restore cgroups"),
        ("--lazy-pages", "lazy migration: dump serves pages / restore faults them in"),
        ("--display-stats", "print CRIU's statistics on standard output"),
    ):
        p.add_argument(*flag.split("/"), action="store_true", default=None, help=help_text)
    p.add_argument("--timeout", type=int, metavar="SEC", help="give up if CRIU takes longer than SEC seconds")
    p.add_argument("--network-lock", choices=["iptables", "nftables", "skip"],
                   help="how to lock the network while the tree is frozen")
    p.add_argument("--external", action="append", metavar="RES", help="external resource (repeatable)")
    p.add_argument("--root", metavar="PATH", help="root of the tree's mount namespace")
    p.add_argument("--container", metavar="FILE",
                   help="the tree is a container: its ContainerOptions as JSON (`pycriu container options ID`)")
    p.add_argument("--criu-opt", action="append", metavar="NAME[=VALUE]",
                   help="any other CRIU long option (without dashes), passed through the config file")


def _criu_options(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, str | bool] = {}
    for item in args.criu_opt or ():
        name, sep, value = item.partition("=")
        extra[name] = value if sep else True
    return {
        "work_dir": args.work_dir, "log_file": args.log_file, "log_level": args.log_level,
        "tcp_established": args.tcp_established, "tcp_close": args.tcp_close,
        "shell_job": args.shell_job, "ext_unix_sk": args.ext_unix_sk, "file_locks": args.file_locks,
        "link_remap": args.link_remap, "manage_cgroups": args.manage_cgroups,
        "lazy_pages": args.lazy_pages, "display_stats": args.display_stats,
        "external": args.external, "root": args.root, "criu_options": extra or None,
        "timeout": args.timeout, "network_lock": args.network_lock,
    }


def _print_result(kind: str, result: Any, as_json: bool) -> None:
    stats = result.stats.to_dict() if result.stats is not None else None
    if as_json:
        payload = {"result": kind, "log": str(result.log_path), "stats": stats}
        if hasattr(result, "pid"):
            payload["pid"] = result.pid
        print(json.dumps(payload))
        return
    if hasattr(result, "pid"):
        print(f"restored: pid {result.pid}")
    else:
        print(f"dumped into {result.images_dir}")
    if stats:
        print("  " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    print(f"  log: {result.log_path}")


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.undo_kdat:
        from . import kdat

        if os.geteuid() != 0:
            print("pycriu doctor: --undo-kdat needs root (it unmounts /run/criu.kdat)", file=sys.stderr)
            return 2
        done = kdat.remove()
        print("\n".join(done) if done else "nothing of pycriu's kernel-probe cache was in place")
        return 0
    from . import doctor

    return doctor.main(args.criu, as_json=args.json)


def cmd_dump(args: argparse.Namespace) -> int:
    page_server = None
    lazy_port = lazy_address = None
    if args.page_server:
        if args.address is None or args.port is None:
            args.parser.error("--page-server needs --address and --port")
        page_server = PageServerAddress(args.address, args.port)
    elif args.lazy_pages:
        lazy_port, lazy_address = args.port, args.address
    kw = dict(leave_running=args.leave_running, track_mem=args.track_mem, parent_images=args.prev_images_dir,
              leave_stopped=args.leave_stopped, page_server=page_server, lazy_port=lazy_port,
              lazy_address=lazy_address, **_criu_options(args))
    if args.container:
        from .containers import ContainerOptions

        opts = ContainerOptions.load(args.container).dump_options(pid=args.tree, images_dir=args.images_dir, **kw)
    else:
        opts = DumpOptions(pid=args.tree, images_dir=args.images_dir, **kw)
    _print_result("dump", Criu(args.criu).dump(opts), args.json)
    return 0


def _inherit_fd(item: str) -> InheritFd:
    """argparse type for ``--inherit-fd fd[N]:KEY``."""
    fd_part, _, key = item.partition(":")
    number = fd_part[3:-1]
    if not (fd_part.startswith("fd[") and fd_part.endswith("]") and number.isdigit() and key):
        raise argparse.ArgumentTypeError(f"{item!r}: expected fd[N]:KEY, for example fd[3]:pipe:[12345]")
    return InheritFd(int(number), key)


def cmd_restore(args: argparse.Namespace) -> int:
    kw = dict(leave_stopped=args.leave_stopped, inherit_fds=args.inherit_fd or None,
              restore_sibling=args.restore_sibling, **_criu_options(args))
    if args.container:
        from .containers import ContainerOptions

        with ContainerOptions.load(args.container).restore_options(images_dir=args.images_dir, **kw) as opts:
            result = Criu(args.criu).restore(opts)
    else:
        result = Criu(args.criu).restore(RestoreOptions(images_dir=args.images_dir, **kw))
    if args.pidfile:
        with open(args.pidfile, "w") as fh:
            fh.write(f"{result.pid}\n")
    _print_result("restore", result, args.json)
    return 0


def cmd_container(args: argparse.Namespace) -> int:
    from .containers import Runc, RuncContainer

    runc = Runc(root=args.runc_root, criu=find_criu(args.criu))
    if args.action == "options":
        print(json.dumps(RuncContainer(args.id, runc).options().to_dict(), indent=1))
    elif args.action == "checkpoint":
        _print_result("dump", RuncContainer(args.id, runc).checkpoint(
            args.images_dir, leave_running=args.leave_running, criu=Criu(args.criu)), args.json)
    else:
        ct = RuncContainer.restore(args.id, bundle=args.bundle, images_dir=args.images_dir, runc=runc)
        print(json.dumps(ct.state()) if args.json else f"restored: runc container {ct.id} ({ct.status})")
    return 0


def cmd_page_server(args: argparse.Namespace) -> int:
    opts = PageServerOptions(images_dir=args.images_dir, work_dir=args.work_dir, address=args.address,
                             port=args.port, lazy_pages=bool(args.lazy_pages),
                             **({"log_file": args.log_file} if args.log_file else {}))
    with Criu(args.criu).page_server(opts) as ps:
        print(json.dumps({"pid": ps.pid, "address": opts.address, "port": ps.port}) if args.json
              else f"page server pid {ps.pid} listening on {opts.address}:{ps.port}", flush=True)
        ps.wait()
    return 0


def cmd_lazy_pages(args: argparse.Namespace) -> int:
    server = PageServerAddress(args.address, args.port) if args.page_server else None
    opts = LazyPagesOptions(images_dir=args.images_dir, work_dir=args.work_dir, page_server=server,
                            **({"log_file": args.log_file} if args.log_file else {}))
    with Criu(args.criu).lazy_pages(opts) as daemon:
        work_dir = args.work_dir or args.images_dir
        print(json.dumps({"pid": daemon.pid, "work_dir": work_dir}) if args.json else
              f"lazy-pages daemon pid {daemon.pid} ready; restore with --lazy-pages -W {work_dir}", flush=True)
        daemon.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pycriu`` command, with the migration commands when present."""
    parser = argparse.ArgumentParser(prog="pycriu", description="Checkpoint, restore and live-migrate "
                                     "Linux process trees with CRIU.")
    parser.add_argument("--version", action="version", version=f"pycriu {__version__}")
    parser.add_argument("--criu", metavar="PATH", help="criu binary (default: $PYCRIU_CRIU or PATH)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # Every subcommand's parser (the migration ones too) is a SubcommandParser, which takes the
    # same two options after the subcommand (pycriu dump --json ...).
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=SubcommandParser)

    p = sub.add_parser("doctor", help="check that this machine can checkpoint/restore/migrate")
    p.add_argument("--undo-kdat", action="store_true",
                   help="remove pycriu's copy of CRIU's kernel-probe cache (the bind mount on /run/criu.kdat); "
                        "PYCRIU_KDAT=off keeps migrations from setting it up again")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("dump", help="checkpoint a process tree (criu dump)")
    p.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="root of the tree to dump")
    _common(p)
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("-R", "--leave-running", action="store_true", default=None,
                      help="leave the tree running after the dump")
    keep.add_argument("-s", "--leave-stopped", action="store_true", default=None,
                      help="leave the tree stopped after the dump")
    p.add_argument("--page-server", action="store_true", help="send pages to a page server at --address:--port")
    p.add_argument("--track-mem", action="store_true", default=None,
                   help="turn on memory tracking (needs kernel soft-dirty support)")
    p.add_argument("--prev-images-dir", metavar="DIR", help="pre-dump images to build on, relative to -D")
    p.add_argument("--address", help="page server address (with --page-server or --lazy-pages)")
    p.add_argument("--port", type=int, help="page server port (with --page-server or --lazy-pages)")
    _criu_flags(p)
    p.set_defaults(func=cmd_dump, parser=p)

    p = sub.add_parser("restore", help="restore a process tree (criu restore -d)")
    _common(p)
    p.add_argument("-s", "--leave-stopped", action="store_true", default=None,
                   help="leave the restored tree stopped")
    p.add_argument("--inherit-fd", action="append", type=_inherit_fd, metavar="fd[N]:KEY",
                   help="hand our fd N over as KEY")
    p.add_argument("--restore-sibling", action="store_true", default=None,
                   help="restore the tree as a child of this command")
    p.add_argument("--pidfile", metavar="FILE", help="write the restored root pid here")
    _criu_flags(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("page-server", help="run CRIU's page server in the foreground until the dump is done")
    _common(p)
    p.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="listen port (default 0: any free port)")
    p.add_argument("--lazy-pages", action="store_true", help="serve local page images to a lazy-pages daemon")
    p.set_defaults(func=cmd_page_server)

    p = sub.add_parser("lazy-pages", help="run CRIU's lazy-pages daemon for a lazy restore")
    _common(p)
    p.add_argument("--page-server", action="store_true", help="read pages from a remote page server")
    p.add_argument("--address", help="page server address")
    p.add_argument("--port", type=int, help="page server port")
    p.set_defaults(func=cmd_lazy_pages)

    p = sub.add_parser("container", help="runc containers: the options runc uses, checkpoint, restore")
    p.add_argument("--runc-root", metavar="DIR", help="runc's state directory (default /run/runc)")
    csub = p.add_subparsers(dest="action", required=True)
    q = csub.add_parser("options", help="print the ContainerOptions runc would use for container ID, as JSON")
    q.add_argument("id")
    q = csub.add_parser("checkpoint", help="checkpoint container ID with pycriu as runc would (runc restore takes it)")
    q.add_argument("id")
    q.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    q.add_argument("-R", "--leave-running", action="store_true")
    q = csub.add_parser("restore", help="runc restore -d of container ID from images and a bundle")
    q.add_argument("id")
    q.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    q.add_argument("-b", "--bundle", required=True, metavar="DIR")
    p.set_defaults(func=cmd_container)

    importlib.import_module("pycriu.inspect.cli").register(sub)

    try:
        migration_cli = importlib.import_module("pycriu.migration.cli")
    except ModuleNotFoundError as exc:  # only a missing migration package is tolerated
        if exc.name not in ("pycriu.migration", "pycriu.migration.cli"):
            raise
    else:
        migration_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pycriu`` command; returns its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args) or 0)
    except InvalidOptionError as exc:  # bad input, like bad usage
        print(f"pycriu {args.command}: {exc}", file=sys.stderr)
        return 2
    except CriuError as exc:
        print(f"pycriu {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pycriu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
