"""Small process helpers shared by the baseline flows and the references.

Readiness is always a status fd (CRIU's ``--status-fd``, or the receiver's ``--ready-fd``): the
child writes one byte once it is ready; EOF without that byte means it failed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class FlowError(RuntimeError):
    """A step of a benchmark flow failed; the message names the step and CRIU's first error."""


def first_error(log: Path | None) -> str | None:
    """CRIU's first error line in ``log``, skipping the harmless RLIMIT_NOFILE one (PLATFORM.md)."""
    if log is None:
        return None
    try:
        for line in log.read_text(errors="replace").splitlines():
            if "Error (" in line and "RLIMIT_NOFILE" not in line:
                return line.strip()
    except OSError:
        return None
    return None


def run(argv: Sequence[str], *, step: str, log: Path | None = None, timeout: float = 600) -> None:
    """Run one command to completion; raise :class:`FlowError` with its error if it fails."""
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=timeout, start_new_session=True)
    if proc.returncode != 0:
        err = first_error(log) or proc.stderr.decode(errors="replace").strip()[-400:]
        raise FlowError(f"{step} failed (status {proc.returncode}): {err} [{' '.join(argv)}]")


class Daemon:
    """A background command that signals readiness on a status fd; always stopped and reaped."""

    def __init__(self, argv: Sequence[str], *, step: str, log: Path | None = None,
                 status_flag: str | None = "--status-fd", stdout: int | None = subprocess.DEVNULL,
                 timeout: float = 60) -> None:
        self.step = step
        self.log = log
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        argv = list(argv)
        if status_flag is not None:
            argv += [status_flag, str(wfd)]
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=self._stderr, start_new_session=True)
        finally:
            os.close(wfd)
        self.exited_ns: int | None = None
        try:
            ready, _, _ = select.select([rfd], [], [], timeout)
            if not ready:
                raise FlowError(f"{step}: not ready within {timeout:.0f} s")
            if os.read(rfd, 1) == b"":
                code = self.proc.wait()
                raise FlowError(f"{step} failed to start (status {code}): {self._error()}")
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(rfd)

    def _error(self) -> str:
        err = first_error(self.log)
        if err is None:
            try:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace").strip()[-400:]
            except (OSError, ValueError):
                err = ""
        return err or "no error message"

    def wait(self, timeout: float = 600) -> int:
        """Wait for it to finish its job; raise :class:`FlowError` if it failed."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FlowError(f"{self.step}: still running after {timeout:.0f} s") from None
        if self.exited_ns is None:
            self.exited_ns = time.time_ns()
        if code != 0:
            raise FlowError(f"{self.step} exited with status {code}: {self._error()}")
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        self._stderr.close()
