"""Shared fixtures: a real CRIU, sample workloads in their own PID namespaces, and markers whose
skip reasons come from real probes of this machine."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pycriu
from pycriu.workload import Workload

IS_ROOT = os.geteuid() == 0


def _probe_features() -> pycriu.Features | None:
    if not IS_ROOT:
        return None
    try:
        return pycriu.Criu().features()
    except pycriu.CriuError:
        return None


FEATURES = _probe_features()

#: Tests that drive CRIU: they need root.
needs_root = pytest.mark.skipif(not IS_ROOT, reason="not root: checkpoint/restore needs CAP_SYS_ADMIN")
#: Pre-dump and iterative migration need the kernel's soft-dirty memory tracking.
needs_mem_track = pytest.mark.skipif(
    FEATURES is None or not FEATURES.mem_track,
    reason="kernel has no dirty-memory tracking (CONFIG_MEM_SOFT_DIRTY not set): pre-dump unavailable",
)
#: Lazy migration needs userfaultfd.
needs_lazy_pages = pytest.mark.skipif(
    FEATURES is None or not FEATURES.lazy_pages,
    reason="CRIU reports lazy pages unsupported here (no usable userfaultfd)",
)


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    """Restored trees outlive CRIU's worker; as child subreaper this test process inherits and
    reaps them instead of leaving zombies."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """pycriu's temporary files (scratch images, agent roots) in a directory of this test only,
    checked at the end for anything a migration left behind (see ``leak_checked_tmp``)."""
    from migration_support import leak_checked_tmp

    yield from leak_checked_tmp(tmp_path, monkeypatch)


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Python's own Ctrl-C handler for SIGINT during the test. A suite started from a background
    job (``make test &``, nohup, some CI runners) inherits SIGINT ignored, and then a real SIGINT
    never becomes KeyboardInterrupt; the tests of Ctrl-C need it to."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def criu() -> pycriu.Criu:
    if not IS_ROOT:
        pytest.skip("not root: checkpoint/restore needs CAP_SYS_ADMIN")
    return pycriu.Criu()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped: one nothing holds."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def zombie() -> Iterator[tuple[int, int]]:
    """(zombie, its parent): a child that exited and that its parent does not reap."""
    parent = subprocess.Popen([sys.executable, "-c", "import os, time\npid = os.fork()\n"
                               "if pid == 0: os._exit(0)\n"
                               "print(pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        yield int(parent.stdout.readline()), parent.pid
    finally:
        parent.kill()
        parent.wait()


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[Callable[..., Workload]]:
    """Factory: ``workload(mib=16, children=0, threads=0, listen=None)`` starts a sample workload
    in its own PID namespace; every workload (and every copy restored from it) is killed at the
    end of the test."""
    made: list[Workload] = []

    def make(**kwargs: object) -> Workload:
        w = Workload(tmp_path / f"state-{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


_REASON_MARKERS = {
    "not root": "root",
    "dirty-memory tracking": "mem_track",
    "lazy pages": "lazy",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Derive the selection markers from what a test really needs, so ``-m criu``, ``-m "not
    root"``, ``-m lazy`` select by fact: the ``criu`` fixture means real CRIU (and root), and each
    capability skip carries the marker of its capability."""
    for item in items:
        if "criu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.criu)
            item.add_marker(pytest.mark.root)
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            for text, name in _REASON_MARKERS.items():
                if text in reason:
                    item.add_marker(name)
