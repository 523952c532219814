"""A one-connection TCP receiver, the benchmark's stand-in for ``nc -l`` (not installed here).

Run as a script (``python3 bench/_tcp.py``), also inside ``ip netns exec``:

``recv --bind ADDR --port PORT [--ready-fd FD] [--discard]``
    listen, write one byte to FD once listening, accept one connection, copy everything it sends
    to stdout (or count and drop it with ``--discard``), and when the sender closes, answer with
    the byte count (8 bytes, little-endian) before closing.

The sending side of the baseline's image copy is bash's own ``/dev/tcp`` redirection
(``tar -c -C SRC . > /dev/tcp/ADDR/PORT``); the link throughput reference sends from the harness.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys


def recv(bind: str, port: int, ready_fd: int | None, discard: bool) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsk:
        lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsk.bind((bind, port))
        lsk.listen(1)
        if ready_fd is not None:
            os.write(ready_fd, b"\0")
            os.close(ready_fd)
        conn, _ = lsk.accept()
    total = 0
    out = sys.stdout.buffer
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
            if not discard:
                out.write(view[:n])
        if not discard:
            out.flush()
        try:
            conn.sendall(struct.pack("<Q", total))
        except OSError:
            pass  # a bash /dev/tcp sender is gone already
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--ready-fd", type=int)
    r.add_argument("--discard", action="store_true")
    args = ap.parse_args()
    recv(args.bind, args.port, args.ready_fd, args.discard)


if __name__ == "__main__":
    main()
