"""Options of pre-dumps and of the dumps built on them, shown by the effect: the way CRIU read
the memory, recorded in the pre-dump's inventory; the parent's copies of pages that a dump
writes again, punched out of the parent with auto_dedup; the pidfds a pre-dump leaves in its
pidfd store for the next iteration. These need the kernel's dirty-memory
tracking (soft-dirty): where it is missing they skip, and ``make test-vm
VM_TESTS=tests/test_option_effects_predump.py`` runs them on Debian 12's own kernel.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import array
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_mem_track, needs_root

import pycriu
import pycriu.images
from pycriu.workload import Workload

pytestmark = [needs_root, needs_mem_track, pytest.mark.criu]

WorkloadFactory = Callable[..., Workload]
PRE_DUMP_SPLICE, PRE_DUMP_READ = 1, 2  # the values CRIU writes in the inventory (criu/include/cr_options.h)


def _images(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def _recorded_mode(images: Path) -> int:
    return int(pycriu.images.loads((images / "inventory.img").read_bytes())["entries"][0]["pre_dump_mode"])


def test_pre_dump_mode_is_how_the_pre_dump_read_the_memory_as_its_inventory_records(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    w = workload(mib=8, touch=0.2)
    for name, mode, recorded in (("default", None, PRE_DUMP_SPLICE),
                                 ("splice", pycriu.PreDumpMode.SPLICE, PRE_DUMP_SPLICE),
                                 ("read", pycriu.PreDumpMode.READ, PRE_DUMP_READ)):
        result = criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, name), track_mem=True,
                                                     pre_dump_mode=mode))
        assert result.stats is not None and result.stats.pages_written >= 8 * 256, name
        assert _recorded_mode(tmp_path / name) == recorded, name
    assert w.alive()


def _blocks(images: Path) -> int:
    """Disk blocks the page images of ``images`` take (punched holes take none)."""
    return sum(p.stat().st_blocks for p in images.glob("pages-*.img"))


def test_auto_dedup_punches_the_parent_s_copies_of_the_pages_a_dump_writes_again(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    """The workload rewrites a fifth of its memory each beat. A pre-dump on top of another
    leaves the first one's pages on disk; a dump with auto_dedup on top of the second punches
    out of it the pages it writes again."""
    w = workload(mib=16, touch=0.2)
    criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, "pre-1"), track_mem=True))
    w.wait_beats(5)
    first = _blocks(tmp_path / "pre-1")
    criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, "pre-2"), track_mem=True,
                                        parent_images="../pre-1"))
    assert _blocks(tmp_path / "pre-1") == first, "without auto_dedup the parent keeps its pages"
    w.wait_beats(5)
    second = _blocks(tmp_path / "pre-2")
    final = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "dump"), track_mem=True,
                                         parent_images="../pre-2", auto_dedup=True))
    assert final.stats is not None and final.stats.pages_written > 0
    assert _blocks(tmp_path / "pre-2") < second, "auto_dedup did not punch the parent's rewritten pages"
    restored = criu.restore(pycriu.RestoreOptions(images_dir=tmp_path / "dump"))
    w.adopt(restored.pid)
    w.wait_beats(3)
    got, want = w.check_memory()
    assert got == want, "the restored memory is not what the workload had written"


def _peek_pidfd(store: socket.socket) -> tuple[int, int]:
    """The first datagram in the pidfd store, left there: the pid it names and a copy of its
    pidfd. (``socket.recv_fds`` of Python 3.11 drops its flags, MSG_PEEK with them.)"""
    data, ancdata, _, _ = store.recvmsg(16, socket.CMSG_SPACE(array.array("i").itemsize), socket.MSG_PEEK)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    assert len(fds) == 1, f"the store's datagram carries {len(fds)} fds"
    return int.from_bytes(data, sys.byteorder), fds[0]


def test_pidfd_store_sk_keeps_a_pidfd_of_each_pre_dumped_task_for_the_next_iteration(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> None:
    """A pre-dump given the store leaves there a pidfd of the tree's task; a dump on top of it
    needs that same store (CRIU refuses another, empty one) and takes the pidfds out of it."""
    w = workload(mib=4)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as store, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=_images(tmp_path, "pre"), track_mem=True,
                                            pidfd_store_sk=store.fileno()))
        store.setblocking(False)
        pid, pidfd = _peek_pidfd(store)
        try:
            assert pid == w.pid
            assert f"Pid:\t{w.pid}\n" in Path(f"/proc/self/fdinfo/{pidfd}").read_text(), "not a pidfd of the task"
        finally:
            os.close(pidfd)
        with pytest.raises(pycriu.DumpError) as info:
            criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "other"), track_mem=True,
                                         parent_images="../pre", leave_running=True, pidfd_store_sk=other.fileno()))
        assert "No pidfds found in pidfd store" in (info.value.criu_message or ""), info.value.criu_message
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "dump"), track_mem=True,
                                     parent_images="../pre", leave_running=True, pidfd_store_sk=store.fileno()))
        with pytest.raises(BlockingIOError):
            store.recv(16)  # CRIU took the pidfds out
    assert w.alive()
