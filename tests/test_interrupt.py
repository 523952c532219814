"""Ctrl-C while CRIU works: the signal waits until CRIU has answered, then KeyboardInterrupt is
raised with what the operation achieved, so a restored tree or a finished dump is never lost."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.usefixtures("ctrl_c")]


def interrupt_this_thread_soon(delay: float = 0.05) -> Callable[[str, int], None]:
    """A notify callback that, at the first notification, arranges a real SIGINT aimed at this
    very thread ``delay`` seconds later, while it is inside libcriu waiting for CRIU's answer."""
    target = threading.get_ident()
    armed: list[threading.Timer] = []

    def notify(action: str, pid: int) -> None:
        if not armed:
            timer = threading.Timer(delay, signal.pthread_kill, args=(target, signal.SIGINT))
            armed.append(timer)
            timer.start()

    return notify


def test_ctrl_c_during_a_restore_keeps_the_restored_tree(
        criu: pycriu.Criu, workload: Callable[..., Workload], images_dir: Path) -> None:
    w = workload(mib=128)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    with pytest.raises(KeyboardInterrupt) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir, notify=interrupt_this_thread_soon()))
    result = info.value.result  # type: ignore[attr-defined]
    assert isinstance(result, pycriu.RestoreResult)
    w.adopt(result.pid)
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


def test_ctrl_c_during_a_dump_reports_the_finished_dump(
        criu: pycriu.Criu, workload: Callable[..., Workload], images_dir: Path) -> None:
    w = workload(mib=128)
    with pytest.raises(KeyboardInterrupt) as info:
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=interrupt_this_thread_soon()))
    result = info.value.result  # type: ignore[attr-defined]
    assert isinstance(result, pycriu.DumpResult)
    assert result.stats is not None and result.stats.pages_written > 0
    assert not w.alive()
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    w.adopt(restored.pid)
    assert w.checksum() == w.expected_checksum
