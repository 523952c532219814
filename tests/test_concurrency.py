"""Operations release the GIL, and concurrent operations keep their own options and callbacks."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import needs_root

import pycriu
from pycriu._threads import SIGNALS, Worker
from pycriu.workload import Workload


@needs_root
def test_the_gil_is_released_while_criu_works(criu: pycriu.Criu, workload: Callable[..., Workload],
                                              images_dir: Path) -> None:
    w = workload(mib=64)
    done = threading.Event()
    errors: list[BaseException] = []

    def dump() -> None:
        try:
            criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=dump)
    spins = 0
    start = time.monotonic()
    thread.start()
    while not done.is_set():
        spins += 1  # pure Python work: advances only while the dump thread does not hold the GIL
    elapsed = time.monotonic() - start
    thread.join()
    assert not errors, errors
    # A held GIL would starve this loop for the whole dump (switch interval 5 ms at best).
    assert elapsed > 0.05
    assert spins / elapsed > 100_000, f"only {spins} spins in {elapsed:.2f} s"


@needs_root
def test_concurrent_operations_keep_their_own_callbacks(criu: pycriu.Criu, workload: Callable[..., Workload],
                                                        tmp_path: Path) -> None:
    """A dump and a restore run at once from one Criu object: each notify callback sees only its
    own operation's notifications (libcriu's callback has no user data; pycriu dispatches per
    thread)."""
    first, second = workload(mib=8), workload(mib=8)
    dumped = tmp_path / "dumped"
    dumped.mkdir()
    criu.dump(pycriu.DumpOptions(pid=second.pid, images_dir=dumped))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    seen: dict[str, list[str]] = {"dump": [], "restore": []}
    results: dict[str, object] = {}

    def dump() -> None:
        try:
            results["dump"] = criu.dump(pycriu.DumpOptions(
                pid=first.pid, images_dir=fresh, notify=lambda action, pid: seen["dump"].append(action)))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results["dump"] = exc

    def restore() -> None:
        try:
            results["restore"] = criu.restore(pycriu.RestoreOptions(
                images_dir=dumped, notify=lambda action, pid: seen["restore"].append(action)))
        except BaseException as exc:  # noqa: BLE001
            results["restore"] = exc

    threads = [threading.Thread(target=dump), threading.Thread(target=restore)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["dump"], pycriu.DumpResult), results["dump"]
    assert isinstance(results["restore"], pycriu.RestoreResult), results["restore"]
    second.adopt(results["restore"].pid)
    assert seen["dump"][0] == "pre-dump" and seen["dump"][-1] == "post-dump"
    assert not set(seen["dump"]) & {"pre-restore", "post-restore", "post-resume"}
    assert seen["restore"][0] == "pre-restore" and "post-resume" in seen["restore"]
    assert not set(seen["restore"]) & {"pre-dump", "post-dump"}
    assert not first.alive()
    second.wait_beats(2)


@needs_root
def test_two_dumps_at_once(criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    """Two trees are dumped at the same time from one Criu object, each with its own callback.
    (CRIU's parasite makes a scratch directory in each task's working directory; the sample
    workloads each have their own, as real containers do.)"""
    loads = [workload(mib=8), workload(mib=8)]
    seen: dict[int, list[str]] = {0: [], 1: []}
    results: dict[int, object] = {}

    def dump(i: int) -> None:
        d = tmp_path / f"img{i}"
        d.mkdir()
        try:
            results[i] = criu.dump(pycriu.DumpOptions(
                pid=loads[i].pid, images_dir=d, notify=lambda action, pid: seen[i].append(action)))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    threads = [threading.Thread(target=dump, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert isinstance(results[i], pycriu.DumpResult), str(results[i])
        assert seen[i].count("post-dump") == 1 and seen[i][0] == "pre-dump", seen
        assert not loads[i].alive()


def test_worker_threads_leave_termination_signals_to_the_main_thread() -> None:
    """A SIGTERM the kernel hands to a worker thread would only set a flag, and an agent whose
    main thread waits in ``accept()`` would never stop (seen once in CI, 1 run in 120 here).
    pycriu's threads block the termination signals for their whole life, so the kernel can only
    deliver them to the main thread."""
    seen: list[set[signal.Signals]] = []
    worker = Worker(lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])), name="probe")
    worker.start()
    worker.join()
    assert SIGNALS <= seen[0]
    assert not SIGNALS & signal.pthread_sigmask(signal.SIG_BLOCK, []), "the main thread is left alone"


@needs_root
def test_a_daemon_started_from_a_worker_stops_on_sigterm(tmp_path: Path) -> None:
    """Children inherit their thread's signal mask: a CRIU daemon started from a worker thread
    must still get the SIGTERM that stops it (not wait out the grace period for SIGKILL)."""
    statuses: list[str] = []

    def start_and_read_mask() -> None:
        ps = pycriu.Criu().page_server(pycriu.PageServerOptions(images_dir=tmp_path, address="127.0.0.1"))
        with ps:
            status = Path(f"/proc/{ps.pid}/status").read_text()
            statuses.append(next(line for line in status.splitlines() if line.startswith("SigBlk:")))

    worker = Worker(start_and_read_mask, name="starter")
    worker.start()
    worker.join()
    blocked = int(statuses[0].split()[1], 16)
    assert not blocked & (1 << (signal.SIGTERM - 1)), statuses[0]
