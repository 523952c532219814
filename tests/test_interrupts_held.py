"""Ctrl-C held back for a step that must finish once begun (a rollback, the end of a lazy
transfer): counted, never raised inside the block; Python's handler is back afterwards. No root."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from pycriu._threads import interrupts_held

pytestmark = pytest.mark.usefixtures("ctrl_c")


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the next Python instruction


def test_ctrl_c_inside_the_block_is_counted_not_raised() -> None:
    with interrupts_held() as held:
        _ctrl_c()
        _ctrl_c()
    assert held.count == 2 and held
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        _ctrl_c()


def test_nothing_held_reads_false() -> None:
    with interrupts_held() as held:
        pass
    assert not held


def test_the_program_s_own_handler_runs_once_after_the_block() -> None:
    calls: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_held():
            _ctrl_c()
            _ctrl_c()
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_nested_blocks_hand_the_count_outwards() -> None:
    with interrupts_held() as outer:
        with interrupts_held() as inner:
            _ctrl_c()
        assert inner.count == 1
    assert outer.count == 1


def test_outside_the_main_thread_nothing_is_replaced() -> None:
    seen: list[Any] = []

    def body() -> None:
        with interrupts_held() as held:
            seen.append(signal.getsignal(signal.SIGINT))
        seen.append(held.count)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler, 0]
