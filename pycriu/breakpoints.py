"""The kernel's hardware-breakpoint path, kept warm while CRIU runs.

CRIU stops every task it infected (dump, pre-dump) or restored at a hardware breakpoint on the
task's way out (compel's ``compel_stop_pie``). A breakpoint is a task-bound perf event. When no
task-bound perf event has existed on the machine for about a second, the perf subsystem switches
its scheduler hooks off (static keys), and the next such event switches them on again: the
kernel rewrites its own code on every CPU and waits for that, here 5 to 20 ms. CRIU's dump pays
it with the tree frozen, its restore inside the downtime; measured on this project's VM
(docs/benchmarks.rst): a 64 MiB lazy dump's frozen part took 28 to 30 ms, 9 to 14 ms with the
hooks kept on, and the first breakpoint of a process 5 to 20 ms against 0.01 ms.

:class:`Warm` holds one disabled, task-bound software event (``PERF_COUNT_SW_DUMMY`` on the
calling thread: it counts nothing and samples nothing) while it is open, so that the hooks stay
on; opening it pays the switch once, before anything is frozen. Every open :class:`Warm` of the
process shares one event. :meth:`pycriu.Criu.dump`, ``pre_dump`` and ``restore`` hold one for
their call; a migration holds one from its start on each host, so that the switch is paid during
the checks. Where the kernel refuses the event (no ``CONFIG_PERF_EVENTS``, a seccomp filter,
``perf_event_paranoid`` for an unprivileged caller) nothing is held and CRIU runs as before: this
is never an error. ``PYCRIU_WARM_BREAKPOINTS=off`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from concurrent.futures import Future
from types import TracebackType

from ._threads import spawn

__all__ = ["Warm", "enabled", "held"]

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}
_PERF_TYPE_SOFTWARE = 1
_PERF_COUNT_SW_DUMMY = 9
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_ATTR_SIZE = 64  # PERF_ATTR_SIZE_VER0: type, size, config, sample_period, sample_type, read_format, flags, ...
_DISABLED = 1  # the first bit of perf_event_attr's flags

_lock = threading.Lock()
_fd: int | None = None
_users = 0
_refused: int | None = None  # the errno of a refused open: not asked again


def enabled() -> bool:
    """Whether pycriu keeps the breakpoint path warm (``PYCRIU_WARM_BREAKPOINTS`` is not ``off``)."""
    return os.environ.get("PYCRIU_WARM_BREAKPOINTS", "").lower() not in ("off", "0", "no")


def held() -> bool:
    """Whether this process holds the event now."""
    with _lock:
        return _fd is not None


def _open_event() -> int | None:
    global _refused
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        return None
    attr = struct.pack("=IIQQQQQ", _PERF_TYPE_SOFTWARE, _ATTR_SIZE, _PERF_COUNT_SW_DUMMY, 0, 0, 0, _DISABLED)
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    # pid 0, cpu -1: this thread on any CPU (task-bound, which is what keeps the hooks on)
    fd = libc.syscall(nr, buf, 0, -1, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        _refused = ctypes.get_errno() or errno.EINVAL
        return None
    return int(fd)


def _acquire() -> None:
    global _fd, _users
    with _lock:
        _users += 1
        if _fd is None and _refused is None:
            _fd = _open_event()


def _release() -> None:
    global _fd, _users
    with _lock:
        _users -= 1
        if _users == 0 and _fd is not None:
            os.close(_fd)
            _fd = None


class Warm:
    """One holder of the process's event: :meth:`open` (or ``with``) takes it, :meth:`close`
    lets it go; the event is closed with its last holder. Both are idempotent."""

    def __init__(self) -> None:
        self._opening: Future[None] | None = None
        self._holds = False

    def open(self) -> Warm:
        """Hold the event now (the first open of a cold machine waits for the switch)."""
        if not self._holds and self._opening is None and enabled():
            _acquire()
            self._holds = True
        return self

    def open_in_background(self) -> Warm:
        """Hold the event from a helper thread, so that the caller does not wait for the switch."""
        if not self._holds and self._opening is None and enabled():
            self._opening = spawn(self._open_later, name="pycriu-warm-breakpoints")
        return self

    def wait(self) -> None:
        """Return once a background open has finished (at once if there was none)."""
        if self._opening is not None:
            self._opening.result()

    def _open_later(self) -> None:
        _acquire()
        self._holds = True

    def close(self) -> None:
        self.wait()
        self._opening = None
        if self._holds:
            self._holds = False
            _release()

    def __enter__(self) -> Warm:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
