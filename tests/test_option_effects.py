"""Options that CRIU acts on, shown by the effect, not by what was sent: each test has a tree that
CRIU refuses (or treats differently) without the option, and shows the difference with it.
docs/options.rst lists every option with the test that proves it (``test_option_table.py``
keeps that table complete)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu.migration.procs import descendants, kill_tree, tree_state, wait_gone
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]


class Program:
    """``python -c CODE`` alone in a PID namespace (the dumpable root of its own session); CODE
    touches ``READY`` when its state is set up."""

    def __init__(self, code: str, ready: Path) -> None:
        self.unshare = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", code],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.unshare.poll() is None, "the program exited before it was ready"
            assert time.monotonic() < deadline, "the program did not get ready"
            time.sleep(0.01)
        self.pid = descendants(self.unshare.pid)[1]
        self.pids = [self.pid]

    def close(self) -> None:
        for pid in self.pids:
            kill_tree(pid)
            wait_gone(pid)
        self.unshare.kill()
        self.unshare.wait()


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Callable[[str], Program]]:
    made: list[Program] = []

    def start(body: str) -> Program:
        ready = tmp_path / f"ready-{len(made)}"
        code = f"import os, time, pathlib\n{body}\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(3600)\n"
        made.append(Program(code, ready))
        return made[-1]

    yield start
    for p in made:
        p.close()


def _images(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def test_ext_unix_sk_dumps_a_connection_to_a_socket_outside_the_tree(
        criu: pycriu.Criu, program: Callable[[str], Program], tmp_path: Path) -> None:
    """A datagram socket connected to a server outside the tree (CRIU never dumps half of a
    stream connection, with or without the option)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "srv"))
        p = program("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                    f"s.connect({str(tmp_path / 'srv')!r})")
        with pytest.raises(pycriu.DumpError) as info:
            criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "without"), leave_running=True))
        assert "External socket is used" in (info.value.criu_message or "")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                     ext_unix_sk=True))
        assert (tmp_path / "with" / "inventory.img").exists()


def test_file_locks_dumps_and_restores_a_held_lock(
        criu: pycriu.Criu, program: Callable[[str], Program], tmp_path: Path) -> None:
    lockfile = tmp_path / "lockfile"
    p = program(f"import fcntl\nf = open({str(lockfile)!r}, 'w')\nfcntl.flock(f, fcntl.LOCK_EX)")
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "without"), leave_running=True))
    assert "file locks are hold" in (info.value.criu_message or "")
    images = _images(tmp_path, "with")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, file_locks=True))
    wait_gone(p.pid)
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images, file_locks=True))
    p.pids.append(restored.pid)
    inode = os.stat(lockfile).st_ino
    holders = [line.split()[4] for line in Path("/proc/locks").read_text().splitlines()
               if line.split()[5].endswith(f":{inode}")]
    assert holders, "the restored tree does not hold the lock"


def test_ghost_limit_lets_a_larger_deleted_file_into_the_images(
        criu: pycriu.Criu, program: Callable[[str], Program], tmp_path: Path) -> None:
    ghost = tmp_path / "ghost"
    p = program(f"f = open({str(ghost)!r}, 'wb')\nf.write(b'x' * (2 << 20))\nf.flush()\nos.unlink({str(ghost)!r})")
    with pytest.raises(pycriu.DumpError) as info:  # CRIU's default limit is 1 MiB
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "without"), leave_running=True))
    assert "increase limit" in (info.value.criu_message or "")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                 ghost_limit=4 << 20))
    assert sum(f.stat().st_size for f in (tmp_path / "with").glob("*.img")) > 2 << 20  # the file's data is in


def test_leave_running_and_leave_stopped_decide_what_the_dump_leaves(
        criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    w = workload(mib=4)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "running"), leave_running=True))
    assert tree_state(w.pid) == "running"
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "stopped"), leave_stopped=True))
    assert tree_state(w.pid) == "stopped"
    os.kill(w.pid, 18)  # SIGCONT
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "default")))
    assert wait_gone(w.pid), "without either, CRIU ends the dumped tree"


def test_work_dir_log_file_and_log_level_shape_criu_s_log(
        criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    w = workload(mib=4)
    work = _images(tmp_path, "work")
    for level, name in ((pycriu.LogLevel.ERROR, "quiet.log"), (pycriu.LogLevel.DEBUG, "chatty.log")):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, name), work_dir=work, log_file=name,
                                     log_level=level, leave_running=True))
        assert not (tmp_path / name / name).exists(), "the log went to images_dir, not work_dir"
    quiet, chatty = (work / "quiet.log").read_text(), (work / "chatty.log").read_text()
    assert "Dumping" not in quiet and "Dumping" in chatty
    assert len(chatty) > 20 * max(len(quiet), 1)
