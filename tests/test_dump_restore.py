"""Checkpoint a running process tree to disk and bring it back.

Every test runs real CRIU on the sample workload (:mod:`pycriu.workload`), which fills memory with
a known pattern and beats every 10 ms. A restore is correct when the restored tree computes the
same memory checksum as before the dump and its heartbeat keeps advancing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu.migration.procs import tree_state
from pycriu.workload import Workload

pytestmark = needs_root

WorkloadFactory = Callable[..., Workload]


def proc_state(pid: int) -> str:
    """The one-letter state of ``pid`` in /proc (R, S, T, t, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def open_files(pid: int) -> list[str]:
    """What the fds of ``pid`` point to."""
    fd_dir = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]


def dump_and_restore(criu: pycriu.Criu, w: Workload, images_dir: Path) -> pycriu.RestoreResult:
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    return restored


def test_round_trip_restores_memory_and_the_heartbeat_continues(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=32)
    source_pid = w.pid
    beat_at_dump = w.state["beat"]

    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    # By default CRIU kills the dumped tree.
    assert not w.alive(source_pid)
    assert (images_dir / "inventory.img").exists()

    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    assert restored.pid > 0 and restored.pid != source_pid
    assert w.alive()
    # The heartbeat resumes where it stopped, and the memory is bit for bit what it was.
    assert w.wait_beats(5)["beat"] >= beat_at_dump + 5
    assert w.checksum() == w.expected_checksum


def test_dump_and_restore_report_criu_statistics(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=16)

    dumped = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    assert dumped.images_dir == images_dir
    assert dumped.log_path == images_dir / "dump.log" and dumped.log_path.exists()
    stats = dumped.stats
    assert isinstance(stats, pycriu.DumpStats)
    assert stats.frozen_time > 0
    assert stats.freezing_time <= stats.frozen_time
    # 16 MiB of pattern is at least 4096 pages, all of them written to disk.
    assert stats.pages_written >= 16 * 256
    assert stats.pages_scanned >= stats.pages_written
    assert stats.pages_lazy == 0

    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    assert restored.log_path == images_dir / "restore.log" and restored.log_path.exists()
    rstats = restored.stats
    assert isinstance(rstats, pycriu.RestoreStats)
    assert rstats.restore_time > 0
    # Forking a one-process tree can take less than CRIU's 1 µs resolution.
    assert 0 <= rstats.forking_time <= rstats.restore_time
    assert rstats.pages_restored > 0
    assert set(rstats.to_dict()) == {"forking_time", "restore_time", "pages_compared",
                                     "pages_skipped_cow", "pages_restored"}


def test_leave_running_keeps_the_source_beating_and_still_writes_images(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8)

    result = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, leave_running=True))

    assert w.alive()
    w.wait_beats(5)
    assert w.checksum() == w.expected_checksum
    assert (images_dir / "inventory.img").exists()
    assert list(images_dir.glob("pages-*.img"))
    assert result.stats is not None and result.stats.pages_written > 0


def test_leave_stopped_reaches_criu_through_the_config_file(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    """libcriu has no setter for ``leave_stopped``: pycriu writes it to a CRIU config file. The
    source being left stopped (not killed, not running) proves the option got through."""
    w = workload(mib=8, children=1)
    child = int(Path(f"/proc/{w.pid}/task/{w.pid}/children").read_text().split()[0])
    assert ("leave-stopped", None) in pycriu.DumpOptions(
        pid=w.pid, images_dir=images_dir, leave_stopped=True).config_entries()

    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, leave_stopped=True))

    # stopped, or with CRIU's SIGSTOP queued and not yet taken: on a loaded machine the task
    # may still read R for a moment after CRIU detached (procs.tree_state reads both, in order)
    assert tree_state(w.pid) == "stopped"
    assert tree_state(child) == "stopped"
    beat = w.state["beat"]
    time.sleep(0.3)
    assert w.state["beat"] == beat, "a stopped tree must not beat"

    # SIGCONT to the workload's process group wakes the whole tree, intact.
    os.killpg(os.getpgid(w.pid), signal.SIGCONT)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_display_stats_makes_criu_print_its_statistics(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """``display_stats`` also travels through the config file; CRIU then prints its statistics
    on the caller's stdout, like ``criu dump --display-stats``."""
    w = workload(mib=8)

    dumped = criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, display_stats=True))
    out = capfd.readouterr().out
    assert "Displaying dump stats:" in out
    assert dumped.stats is not None
    assert f"Memory pages written: {dumped.stats.pages_written} " in out

    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir, display_stats=True))
    w.adopt(restored.pid)
    out = capfd.readouterr().out
    assert "Displaying restore stats:" in out
    assert restored.stats is not None
    assert f"Pages restored: {restored.stats.pages_restored} " in out


def test_without_display_stats_criu_prints_nothing(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    w = workload(mib=8)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, leave_running=True))
    assert capfd.readouterr().out == ""


def test_a_tree_of_processes_talking_over_pipes_keeps_talking(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8, children=2)
    echoes_at_dump = w.state["echoes"]

    restored = dump_and_restore(criu, w, images_dir)

    children = Path(f"/proc/{restored.pid}/task/{restored.pid}/children").read_text().split()
    assert len(children) == 2
    # Each beat sends a byte to each child and reads its echo: both pipes work again.
    st = w.wait_beats(5)
    assert st["echoes"] >= echoes_at_dump + 2 * 5
    assert w.checksum() == w.expected_checksum


def test_threads_are_restored_and_keep_counting(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8, threads=3)
    w.wait_beats(2)
    counted_at_dump = w.state["threads"]

    restored = dump_and_restore(criu, w, images_dir)

    assert len(os.listdir(f"/proc/{restored.pid}/task")) == 1 + 3
    w.wait_beats(5)
    assert w.state["threads"] > counted_at_dump


def test_open_regular_files_are_reopened(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    """The workload keeps its state file open and writes through that fd."""
    w = workload(mib=8)
    assert str(w.state_path) in open_files(w.pid)

    restored = dump_and_restore(criu, w, images_dir)

    assert str(w.state_path) in open_files(restored.pid)
    # The restored process writes through the restored fd: the heartbeat in the file advances.
    w.wait_beats(3)


def test_a_listening_tcp_socket_accepts_connections_after_restore(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=8, listen=0)
    port = w.state["port"]
    assert isinstance(port, int) and port > 0

    dump_and_restore(criu, w, images_dir)

    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        reply = conn.makefile("rb").readline().decode()
    assert reply == f"alive {w.expected_checksum}\n"
