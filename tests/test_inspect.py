"""pycriu inspect: what a checkpoint holds, checked against what /proc showed of the live tree.

One tree (tests/memory_support.py: a process with a thread, a child, a TCP listener and an
abstract Unix socket) is dumped once with CRIU, left running; each test compares one part of
``pycriu.inspect.inspect`` with the live processes' /proc, or the command's output with the API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import needs_root
from memory_support import KnownTree, known_tree

import pycriu
from pycriu.images import ImageError
from pycriu.inspect import Inspection, inspect
from pycriu.workload import PidNamespaceTree

pytestmark = [needs_root, pytest.mark.criu]


@dataclass
class Dumped:
    tree: KnownTree
    images: Path
    #: pid in the tree's namespace -> pid on this host
    host_pid: dict[int, int]


def _ns_pid(host_pid: int) -> int:
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {host_pid}")


def _tree_pids(root: int) -> list[int]:
    out = [root]
    for tid in os.listdir(f"/proc/{root}/task"):
        children = Path(f"/proc/{root}/task/{tid}/children").read_text().split()
        for c in children:
            out.extend(_tree_pids(int(c)))
    return out


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    work = tmp_path_factory.mktemp("inspect")
    with known_tree(work) as kt:
        images = kt.dump(work / "images")
        host = {_ns_pid(p): p for p in _tree_pids(kt.tree.pid)}
        yield Dumped(kt, images, host)


@pytest.fixture(scope="module")
def seen(dumped: Dumped) -> Inspection:
    return inspect(dumped.images)


def test_the_tree_is_the_live_tree_with_its_full_command_lines(dumped: Dumped, seen: Inspection) -> None:
    assert sorted(p.pid for p in seen.processes) == sorted(dumped.host_pid)
    for p in seen.processes:
        host = dumped.host_pid[p.pid]
        assert p.cmdline == Path(f"/proc/{host}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert p.comm == Path(f"/proc/{host}/comm").read_text().strip()
        live_threads = sorted(Path(f"/proc/{host}/task/{t}/comm").read_text().strip()
                              for t in os.listdir(f"/proc/{host}/task"))
        assert sorted(t.comm for t in p.threads) == live_threads
        assert p.state == "alive"
        assert p.uid == os.stat(f"/proc/{host}").st_uid
    root = next(p for p in seen.processes if p.ppid == 0)
    assert len(root.threads) == 2  # the main thread and the sleeper
    assert [p.ppid for p in seen.processes if p is not root] == [root.pid]


def test_every_fd_is_there_and_sockets_show_their_addresses(dumped: Dumped, seen: Inspection) -> None:
    for p in seen.processes:
        host = dumped.host_pid[p.pid]
        live = {int(fd) for fd in os.listdir(f"/proc/{host}/fd")}
        assert {fd.fd for fd in p.fds if isinstance(fd.fd, int)} == live
        cwd = next(fd for fd in p.fds if fd.fd == "cwd")
        assert cwd.description == os.readlink(f"/proc/{host}/cwd")
    port = dumped.tree.port
    tcp = [s for s in seen.sockets if s.proto == "tcp"]
    assert [(s.local, s.state) for s in tcp] == [(f"127.0.0.1:{port}", "LISTEN")]
    # the child inherited the listener: both hold it
    assert len(tcp[0].holders) == 2
    unix = [s for s in seen.sockets if s.family == "UNIX" and s.local == "@pycriu-inspect-test"]
    assert [s.state for s in unix] == ["LISTEN"]


def test_the_mappings_are_those_of_proc_maps(dumped: Dumped, seen: Inspection) -> None:
    for p in seen.processes:
        live: list[tuple[int, int]] = []
        for line in Path(f"/proc/{dumped.host_pid[p.pid]}/maps").read_text().splitlines():
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            # kernels since 6.13 show the vDSO's data as [vvar] and [vvar_vclock]; CRIU keeps
            # them as one area, as it restores them
            if line.endswith("[vvar_vclock]") and live and live[-1][1] == start:
                live[-1] = (live[-1][0], end)
                continue
            live.append((start, end))
        assert [(m.start, m.end) for m in p.mappings] == live
        region = next(m for m in p.mappings if m.start == dumped.tree.base)
        assert (region.kind, region.prot, region.pages_images, region.pages_lazy) == ("anon", "rw-", 512, 0)


def test_the_statistics_are_criu_s_and_the_pages_add_up(seen: Inspection) -> None:
    assert seen.stats["pages_written"] > 512
    assert seen.stats["frozen_time"] > 0
    own = sum(m.pages_images for p in seen.processes for m in p.mappings)
    shared_counted_twice = 0  # the tree has no shared memory: every page is one process's
    assert own - shared_counted_twice == seen.stats["pages_written"]
    assert seen.pages_bytes == seen.stats["pages_written"] * os.sysconf("SC_PAGE_SIZE")


def test_the_environment_is_read_only_when_asked(dumped: Dumped, seen: Inspection) -> None:
    assert all(p.environ is None for p in seen.processes)
    assert "environ" not in seen.processes[0].to_dict()
    with_env = inspect(dumped.images, environ=True)
    root = next(p for p in with_env.processes if p.ppid == 0)
    live = dict(e.split("=", 1) for e in
                Path(f"/proc/{dumped.host_pid[root.pid]}/environ").read_bytes().decode().split("\0") if e)
    assert root.environ == live


def _pycriu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pycriu", *args], capture_output=True, text=True, timeout=60)


def test_the_command_prints_the_api_s_data_as_json_and_as_text(dumped: Dumped, seen: Inspection) -> None:
    out = _pycriu("inspect", str(dumped.images), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(seen.to_dict()))
    text = _pycriu("inspect", str(dumped.images), "--all")
    assert text.returncode == 0, text.stderr
    root = next(p for p in seen.processes if p.ppid == 0)
    assert " ".join(root.cmdline or []) in text.stdout
    assert f"tcp 127.0.0.1:{dumped.tree.port} LISTEN" in text.stdout
    assert f"{dumped.tree.base:012x}-" in text.stdout


def test_a_directory_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no inventory.img"):
        inspect(tmp_path)
    out = _pycriu("inspect", str(tmp_path))
    assert out.returncode == 1
    assert "not a CRIU images directory" in out.stderr and "Traceback" not in out.stderr


def test_an_image_missing_from_the_checkpoint_is_named(dumped: Dumped, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dumped.images.iterdir():
        if f.name != "mm-1.img":
            os.link(f, broken / f.name)
    with pytest.raises(ImageError, match=r"mm-1.img: missing"):
        inspect(broken)


ZOMBIE_AND_STOPPED = """
import os, signal, time
if os.fork() == 0:
    os._exit(7)                      # never reaped: a zombie with exit code 7
stopped = os.fork()
if stopped == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(1000)
time.sleep(0.3)
open("ready", "w").close()
time.sleep(1000)
"""


def test_a_zombie_and_a_stopped_child_are_shown_as_they_were(tmp_path: Path) -> None:
    """CRIU writes a stopped task as state 3 (crit calls 3 "Zombie") and a zombie as 2, with its wait
    status (7 << 8) as the exit code."""
    (tmp_path / "tree.py").write_text(ZOMBIE_AND_STOPPED)
    tree = PidNamespaceTree([sys.executable, "tree.py"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "the tree did not start"
            time.sleep(0.02)
        images = tmp_path / "images"
        images.mkdir()
        pycriu.Criu().dump(pycriu.DumpOptions(pid=tree.pid, images_dir=images, log_file="dump.log", shell_job=True,
                                              leave_running=True))
    finally:
        tree.close()
    seen = inspect(images)
    states = sorted((p.state, p.exit_code) for p in seen.processes)
    assert states == [("alive", None), ("stopped", None), ("zombie", 7)]
    zombie = next(p for p in seen.processes if p.state == "zombie")
    assert zombie.mappings == [] and zombie.fds == []
