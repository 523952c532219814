"""Ending a child process: one way, used for every child pycriu starts (CRIU's workers and
daemons, agents, guards)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop_process"]


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0, *,
                 ask: signal.Signals | None = signal.SIGTERM) -> int:
    """End ``proc`` and reap it; return its exit status.

    If it still runs it is sent ``ask`` (``None``: nothing, for a child that is already ending
    because its input or socket was closed), given ``grace`` seconds, then SIGKILLed. Ctrl-C
    while waiting kills it at once (never leave it behind) and goes on."""
    try:
        if proc.poll() is None and ask is not None:
            proc.send_signal(ask)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    return proc.wait()
