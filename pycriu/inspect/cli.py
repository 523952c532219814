"""The ``pycriu inspect`` and ``pycriu diff`` commands (registered by :mod:`pycriu.cli`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from .._argparse import SubcommandParser
from ..images.diff import diff
from ..images.errors import ImageError
from ..images.memory import Hit, Memory
from ..migration.modes import advise
from .build import images_dir, inspect
from .render import SECTIONS, render, render_diff, render_hits

__all__ = ["register", "main"]


def _address(text: str) -> tuple[int, int, int]:
    try:
        pid, addr, size = text.split(":")
        return int(pid), int(addr, 16), int(size, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give PID:ADDRESS:SIZE (address in hex: 1:7f00a000:64)") from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="show what a checkpoint holds: processes, files, sockets, mounts, memory",
        description="Show what the checkpoint in DIR holds (a CRIU images directory, or a Podman / CRI-O "
                    "checkpoint unpacked). With no section chosen: the tree and CRIU's statistics as text, "
                    "everything with --json.")
    p.add_argument("dir", metavar="DIR")
    for name, what in (("ps", "the process tree"), ("files", "open files of each process"),
                       ("sockets", "sockets and who holds them"), ("mounts", "mounts"),
                       ("mems", "memory mappings, with how many pages the images hold"),
                       ("stats", "CRIU's dump statistics")):
        p.add_argument(f"--{name}", action="append_const", const=name, dest="sections", help=f"show {what}")
    p.add_argument("--all", action="store_const", const=list(SECTIONS), dest="all", help="show every section")
    p.add_argument("--env", action="store_true", help="read each process's environment too (it may hold secrets)")
    find = p.add_mutually_exclusive_group()
    find.add_argument("--search", metavar="TEXT", help="find TEXT in the processes' memory")
    find.add_argument("--search-hex", metavar="HEX", help="find these bytes (hex: 'deadbeef') in memory")
    find.add_argument("--regex", metavar="RE", help="find a regular expression (Python syntax) in memory")
    find.add_argument("--read", metavar="PID:ADDR:SIZE", type=_address,
                      help="print SIZE bytes of process PID's memory at ADDR (hex), as a hex dump")
    p.add_argument("--pid", type=int, action="append", help="search only this process (repeatable)")
    p.add_argument("--limit", type=int, default=100, help="most hits listed (all are counted; default 100)")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "diff", help="pages that changed between two checkpoints of one tree, and the migration flow that fits",
        description="Compare checkpoint A with the later checkpoint B of the same tree, page by page by content; "
                    "say how fast the workload rewrote memory and which migration flow fits it.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--bandwidth", type=float, default=1000.0, metavar="MBIT",
                   help="the migration link's speed, Mbit/s, for the advice (default 1000)")
    p.set_defaults(func=cmd_diff)


def main(argv: list[str]) -> int:
    """``pycriu inspect ...`` / ``pycriu diff ...`` on their own (``pycriu.cli`` hands them over
    before it loads anything else)."""
    parser = argparse.ArgumentParser(prog="pycriu")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                   parser_class=SubcommandParser))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"pycriu {args.command}: interrupted", file=sys.stderr)
        return 130


def _hexdump(address: int, data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{address + i:012x}  {chunk.hex(' '):<47}  {text}")
    return "\n".join(lines)


def _fail(command: str, exc: Exception) -> int:
    print(f"pycriu {command}: {exc}", file=sys.stderr)
    return 1


def cmd_inspect(args: argparse.Namespace) -> int:
    as_json = bool(getattr(args, "json", False))
    try:
        directory, _ = images_dir(args.dir)
        with Memory(directory) as mem:
            if args.read is not None:
                pid, address, size = args.read
                data = mem.space(pid).read(address, size)
                print(json.dumps({"pid": pid, "address": address, "hex": data.hex()}) if as_json
                      else _hexdump(address, data))
                return 0
            if args.search is not None or args.search_hex is not None or args.regex is not None:
                return _search(args, mem, as_json)
            result = inspect(args.dir, environ=args.env, memory=mem)
    except (ImageError, ValueError) as exc:
        return _fail("inspect", exc)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result, args.all or args.sections or ("ps", "stats")))
    return 0


def _search(args: argparse.Namespace, mem: Memory, as_json: bool) -> int:
    pids = args.pid or mem.pids()
    count = 0
    hits: list[Hit] = []
    if args.regex is not None:
        try:
            pattern = re.compile(args.regex.encode())
        except re.error as e:
            raise ValueError(f"--regex {args.regex!r}: {e}") from None
        what = f"/{args.regex}/"
        for pid in pids:
            n, found = mem.space(pid).find_regex(pattern, max(args.limit - len(hits), 0))
            count += n
            hits += found
    else:
        try:
            needle = args.search.encode() if args.search is not None else bytes.fromhex(args.search_hex)
        except ValueError:
            raise ValueError(f"--search-hex {args.search_hex!r}: not hex digits (give 'deadbeef')") from None
        what = repr(args.search) if args.search is not None else args.search_hex
        for pid in pids:
            n, found = mem.space(pid).find(needle, max(args.limit - len(hits), 0))
            count += n
            hits += found
    if as_json:
        print(json.dumps({"count": count, "hits": [h.to_dict() for h in hits]}, indent=2))
    else:
        print(render_hits(what, count, hits))
    return 0 if count else 1


def cmd_diff(args: argparse.Namespace) -> int:
    try:
        a_dir, _ = images_dir(args.a)
        b_dir, _ = images_dir(args.b)
        with Memory(a_dir) as a, Memory(b_dir) as b:
            result = diff(a, b)
            memory = b.held_bytes()
    except (ImageError, ValueError) as exc:
        return _fail("diff", exc)
    rate = result.dirty_rate
    advice = advise(rate, memory, args.bandwidth * 1e6 / 8) if rate is not None else None
    if getattr(args, "json", False):
        out = result.to_dict()
        if advice is not None:
            out["advice"] = {"modes": list(advice.modes), "reason": advice.reason,
                             "precopy_converges": advice.precopy_converges,
                             "stop_and_copy_downtime": advice.stop_and_copy_downtime}
        print(json.dumps(out, indent=2))
    else:
        print(render_diff(result, advice))
    return 0
