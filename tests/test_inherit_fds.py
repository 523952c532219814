"""Inherited fds: a tree whose pipe leads outside it is dumped, and restored onto a new pipe that
the caller owns (``RestoreOptions(inherit_fds=[InheritFd(fd, "pipe:[INODE]")])``), as runc does
for a container's stdio. The fd must reach CRIU's worker: a restore then writes into the
caller's pipe, with pycriu's own worker and with ``restore_sibling`` (libcriu's)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu.migration.procs import descendants, kill_tree, wait_gone

pytestmark = [needs_root, pytest.mark.criu]

LOOP = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.02; done"


class Loop:
    """``sh -c LOOP`` in its own PID namespace, its stdout the write end of a pipe we read."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        self.inode = os.fstat(write_fd).st_ino
        self.unshare = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", "sh", "-c", LOOP],
                                        stdin=subprocess.DEVNULL, stdout=write_fd, stderr=subprocess.DEVNULL)
        os.close(write_fd)
        deadline = time.monotonic() + 10
        while len(descendants(self.unshare.pid)) < 2:
            assert time.monotonic() < deadline, "the loop did not start"
            time.sleep(0.01)
        self.pid = descendants(self.unshare.pid)[1]
        self.lines(1)
        self.pids: list[int] = [self.pid]

    def lines(self, n: int, fd: int | None = None, timeout: float = 10.0) -> list[str]:
        """The next ``n`` lines the loop writes into ``fd`` (default: the first pipe)."""
        fd = self.read_fd if fd is None else fd
        got = b""
        deadline = time.monotonic() + timeout
        while got.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"the loop wrote only {got!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, "the pipe was closed"
                got += chunk
        return got.decode().splitlines()

    def close(self) -> None:
        for pid in self.pids:
            kill_tree(pid)
            wait_gone(pid)
        if self.unshare.poll() is None:
            self.unshare.send_signal(signal.SIGKILL)
        self.unshare.wait()
        os.close(self.read_fd)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.mark.parametrize("sibling", [False, True], ids=["pycriu's worker", "restore_sibling"])
def test_a_restored_loop_writes_into_the_pipe_it_inherits(
        criu: pycriu.Criu, loop: Loop, tmp_path: Path, sibling: bool) -> None:
    before = int(loop.lines(1)[-1].split()[1])
    criu.dump(pycriu.DumpOptions(pid=loop.pid, images_dir=tmp_path, shell_job=True,
                                 external=[f"pipe:[{loop.inode}]"]))
    wait_gone(loop.pid)
    new_read, new_write = os.pipe()
    try:
        result = criu.restore(pycriu.RestoreOptions(
            images_dir=tmp_path, shell_job=True, restore_sibling=sibling or None,
            inherit_fds=[pycriu.InheritFd(new_write, f"pipe:[{loop.inode}]")]))
        loop.pids.append(result.pid)
        os.close(new_write)
        new_write = -1
        after = [int(line.split()[1]) for line in loop.lines(3, fd=new_read)]
        assert after[0] > before, "the loop did not go on from where it was dumped"
        assert after == list(range(after[0], after[0] + 3))
    finally:
        os.close(new_read)
        if new_write >= 0:
            os.close(new_write)


def test_an_fd_this_process_does_not_hold_is_refused_by_name(criu: pycriu.Criu, loop: Loop, tmp_path: Path) -> None:
    criu.dump(pycriu.DumpOptions(pid=loop.pid, images_dir=tmp_path, shell_job=True,
                                 external=[f"pipe:[{loop.inode}]"]))
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(pycriu.InvalidOptionError, match=f"fd {w} given to CRIU is not open in this process"):
        criu.restore(pycriu.RestoreOptions(images_dir=tmp_path, shell_job=True,
                                           inherit_fds=[pycriu.InheritFd(w, f"pipe:[{loop.inode}]")]))
