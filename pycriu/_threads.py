"""Worker threads that leave the termination signals to the main thread.

Python runs signal handlers in the main thread only, but the kernel hands a process-directed
signal to any thread that does not block it. A SIGTERM handed to a worker merely sets a flag that
the main thread notices when it next runs Python code: a main thread blocked in ``accept()`` or
``read()`` would never notice it (an agent that ignores ``kill``). Every pycriu thread therefore
blocks these signals for its whole life, so that the kernel delivers them to the main thread and
interrupts whatever it waits for.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["SIGNALS", "Worker", "spawn", "children_get_signals", "HeldInterrupts", "interrupts_held"]

T = TypeVar("T")

#: The signals that stop a pycriu process (and that libcriu calls defer, see ``_raw``).
SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


class Worker(threading.Thread):
    """A daemon thread running ``target(*args)`` with :data:`SIGNALS` blocked."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str) -> None:
        super().__init__(target=target, args=args, name=name, daemon=True)

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        super().run()


def spawn(fn: Callable[..., T], *args: Any, name: str) -> Future[T]:
    """Run ``fn(*args)`` in a :class:`Worker`; its return value, or whatever it raised
    (KeyboardInterrupt included), waits in the returned future. ``future.result(timeout)``
    joins and returns or raises; ``future.done()`` says whether it ended."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
            future.set_exception(exc)
        else:
            future.set_result(value)

    Worker(run, name=name).start()
    return future


@contextmanager
def children_get_signals() -> Iterator[None]:
    """Unblock :data:`SIGNALS` in this thread while a child process is started in the block.

    A child inherits its parent thread's signal mask (Python's ``subprocess`` does not reset
    it): a ``criu page-server`` started from a :class:`Worker` would ignore the ``SIGTERM`` that
    stops it, and be killed after the grace period instead. For the millisecond of the start, a
    signal may reach this thread and wait for the main thread's next Python instruction."""
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class HeldInterrupts:
    """What :func:`interrupts_held` held back: ``count`` Ctrl-Cs (SIGINT) that arrived in its block."""

    def __init__(self) -> None:
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0


@contextmanager
def interrupts_held() -> Iterator[HeldInterrupts]:
    """Hold Ctrl-C back for the block: a step that must finish once begun (a rollback, the end of
    a lazy transfer the destination runs on) is not cut short by an impatient second Ctrl-C.

    Python's own SIGINT handler is replaced for the block by one that only counts; the caller
    reads the count and decides (raise ``KeyboardInterrupt`` after the step, or note it). A
    handler of the program's own is called once at the end instead. SIG_IGN and SIG_DFL are left
    alone, and so is a block outside the main thread (no KeyboardInterrupt is raised there)."""
    held = HeldInterrupts()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield held
        return

    def hold(signum: int, frame: Any) -> None:
        held.count += 1

    signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and previous is not signal.default_int_handler:
            previous(signal.SIGINT, None)
