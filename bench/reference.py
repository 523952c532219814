"""Physical references measured in the same run: what the link can carry.

One TCP stream of ``mib`` MiB from the source namespace to a receiver on the destination side of
the link (``bench/_tcp.py recv --discard``), timed from connect to the receiver's byte-count
answer, so the time covers every byte arriving. ``bytes / throughput`` is the floor of any flow
that moves all pages before the workload resumes.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path

from .netns import Link
from .procs import Daemon, FlowError

TCP_HELPER = Path(__file__).resolve().parent / "_tcp.py"


def receiver_argv(link: Link, port: int, *, discard: bool = False) -> list[str]:
    argv = [sys.executable, "-S", str(TCP_HELPER), "recv", "--bind", link.dst_addr, "--port", str(port)]
    if discard:
        argv.append("--discard")
    return link.dst(argv)


def throughput(link: Link, port: int, mib: int = 256) -> dict[str, float]:
    """Measure one TCP stream over ``link``; returns bytes, seconds and bytes/s."""
    total = mib << 20
    chunk = b"\xa5" * (1 << 20)
    rx = Daemon(receiver_argv(link, port, discard=True), step="throughput receiver",
                status_flag="--ready-fd")
    try:
        with socket.create_connection((link.dst_addr, port), timeout=60) as sk:
            t0 = time.monotonic()
            for _ in range(mib):
                sk.sendall(chunk)
            sk.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 8:
                part = sk.recv(8 - len(answer))
                if not part:
                    break
                answer += part
            elapsed = time.monotonic() - t0
        if len(answer) != 8 or struct.unpack("<Q", answer)[0] != total:
            raise FlowError(f"throughput receiver on {link.name} did not get all {total} bytes")
        rx.wait(30)
    finally:
        rx.stop()
    return {"bytes": float(total), "seconds": elapsed, "bytes_per_s": total / elapsed}
