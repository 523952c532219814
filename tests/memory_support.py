"""A tree whose memory is known, to check what pycriu reads from its checkpoints.

``PATTERN`` (run as ``python -c``) maps ``PAGES`` private anonymous pages and writes into page i
the 8-byte word ``MAGIC ^ i`` at offset 0 and ``TAG`` at offset 8 (through ctypes, so the
interpreter's own objects never hold those bytes: a search finds each exactly where it was
written). It also holds a thread, a child, a listening TCP socket and an abstract Unix socket,
maps 16 pages it never writes, writes ``ready`` (the region's address, the port, the untouched
region's address), and on SIGUSR1 rewrites the first
``REWRITE`` pages (their words become ``MAGIC ^ i ^ 1``) and writes ``rewritten``.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pycriu
from pycriu.workload import PidNamespaceTree

PAGES = 512
REWRITE = 37
MAGIC = 0x5A17C0DE_00000000
TAG = 0x0F1E2D3C4B5A6978

PATTERN = textwrap.dedent(f"""
    import ctypes, os, signal, socket, threading, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = libc.mmap(None, {PAGES} * 4096, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    for i in range({PAGES}):
        ctypes.c_uint64.from_address(base + i * 4096).value = {MAGIC} ^ i
        ctypes.c_uint64.from_address(base + i * 4096 + 8).value = {TAG}
    # mapped, never written: reads as zeros. Read-only, so that it stays a mapping of its own:
    # Linux 6.1 merged an rw one into the region's, next to which it lands (6.18 did not)
    untouched = libc.mmap(None, 16 * 4096, 1, 0x22, -1, 0)
    def rewrite(*_):
        for i in range({REWRITE}):
            ctypes.c_uint64.from_address(base + i * 4096).value = {MAGIC} ^ i ^ 1
        open("rewritten", "w").close()
    signal.signal(signal.SIGUSR1, rewrite)
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    usk = socket.socket(socket.AF_UNIX); usk.bind("\\0pycriu-inspect-test"); usk.listen()
    threading.Thread(target=time.sleep, args=(1000,), daemon=True, name="sleeper").start()
    if os.fork() == 0:
        time.sleep(1000)
    with open("ready.tmp", "w") as f:
        f.write("%d %d %d" % (base, srv.getsockname()[1], untouched))
    os.rename("ready.tmp", "ready")
    while True:
        time.sleep(1000)
""")


def word(i: int, rewritten: bool = False) -> bytes:
    """The 8 bytes at the start of page i."""
    return struct.pack("<Q", MAGIC ^ i ^ (1 if rewritten else 0))


TAG_BYTES = struct.pack("<Q", TAG)


@dataclass
class KnownTree:
    tree: PidNamespaceTree
    work: Path
    base: int
    port: int
    #: a mapping of 16 pages the tree never wrote
    untouched: int

    def wait_for(self, name: str, timeout: float = 60.0) -> None:  # generous: the test VM emulates
        deadline = time.monotonic() + timeout
        while not (self.work / name).exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the known-memory tree did not write {name}")
            time.sleep(0.01)

    def dump(self, images: Path) -> Path:
        images.mkdir()
        pycriu.Criu().dump(pycriu.DumpOptions(pid=self.tree.pid, images_dir=images, log_file="dump.log",
                                              shell_job=True, leave_running=True))
        return images

    def rewrite(self) -> None:
        os.kill(self.tree.pid, signal.SIGUSR1)
        self.wait_for("rewritten")


@contextmanager
def known_tree(work: Path) -> Iterator[KnownTree]:
    """The PATTERN tree, running in ``work``; killed on exit, whatever happened."""
    (work / "pattern.py").write_text(PATTERN)
    tree = PidNamespaceTree([sys.executable, "pattern.py"], cwd=work)
    try:
        kt = KnownTree(tree, work, 0, 0, 0)
        kt.wait_for("ready")
        kt.base, kt.port, kt.untouched = (int(x) for x in (work / "ready").read_text().split())
        yield kt
    finally:
        tree.close()
