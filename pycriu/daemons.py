"""CRIU's own page server and lazy-pages daemon, owned by context managers.

libcriu cannot start either (its RPC has no ``PAGE_SERVER`` request, and the lazy-pages daemon
exists only as ``criu lazy-pages``), so these run the ``criu`` binary. They are CRIU's native
processes: memory pages flow between CRIU processes and never through Python.

Readiness is CRIU's own ``--status-fd`` signal (one byte written when the daemon listens), never a
sleep; the real port of a page server started with ``port=0`` is read from CRIU's log. The
daemons run in their own session (a terminal's Ctrl-C does not reach them) and are stopped and
reaped on every path out of the ``with`` block.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

from ._process import stop_process
from ._threads import children_get_signals
from .enums import LogLevel
from .errors import (
    CriuError,
    InvalidOptionError,
    LazyPagesError,
    PageServerError,
    first_error_line,
    stderr_message,
)
from .options import LazyPagesOptions, PageServerAddress, PageServerOptions

__all__ = ["PageServer", "LazyPages", "stop_process"]

_PORT_LINE = re.compile(r"Using (\d+) port")


class _NativeDaemon:
    """A ``criu`` subprocess with a status fd: start, wait for readiness, stop, reap."""

    _error: ClassVar[type[CriuError]] = CriuError
    _command: ClassVar[str] = ""

    def __init__(self, binary: str, log_path: Path, timeout: float) -> None:
        self.binary = binary
        self.log_path = log_path
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._entered = False

    # -- subclass hooks --------------------------------------------------------------------------

    def _argv(self, status_fd: int) -> list[str]:
        raise NotImplementedError

    def _on_ready(self) -> None:
        pass

    def _status_fd(self) -> int | None:
        return None

    def _tell_ready(self) -> None:
        """As CRIU does with ``--status-fd``: one zero byte to the caller's fd once the daemon is
        ready (pycriu reads CRIU's own byte first; the caller's fd stays the caller's)."""
        fd = self._status_fd()
        if fd is None:
            return
        try:
            os.write(fd, b"\0")
        except OSError as exc:
            raise self._error(f"cannot write to status_fd {fd}: {exc.strerror}", operation=self._command,
                              hint="pass an fd open for writing (the write end of a pipe)") from None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The daemon's pid (a ``criu`` process)."""
        if self._proc is None:
            raise RuntimeError(f"{self._command} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the daemon process still runs."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the daemon and return once CRIU reports it ready; raise if it fails to start."""
        if self._proc is not None:
            raise RuntimeError(f"{self._command} already started")
        self.log_path.unlink(missing_ok=True)
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        self._stderr = tempfile.TemporaryFile()
        try:
            try:
                with children_get_signals():  # stop() ends it with SIGTERM, from any thread
                    self._proc = subprocess.Popen(
                        self._argv(wfd), pass_fds=(wfd,), stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True,
                    )
            finally:
                os.close(wfd)
            self._wait_ready(rfd)
            self._on_ready()
            self._tell_ready()
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(rfd)

    def _wait_ready(self, rfd: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(f"{self._command} did not become ready within {self.timeout:g} s",
                                  operation=self._command, log_path=self.log_path,
                                  criu_message=first_error_line(self.log_path))
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                break
        if os.read(rfd, 1) == b"":  # EOF without the status byte: the daemon failed
            assert self._proc is not None
            code = self._proc.wait()
            raise self._failure(f"{self._command} failed to start (exit status {code})")

    def _failure(self, message: str) -> CriuError:
        criu_message = first_error_line(self.log_path)
        if criu_message is None and self._stderr is not None:
            criu_message = stderr_message(self._stderr)
        return self._error(message, operation=self._command, criu_message=criu_message,
                           log_path=self.log_path)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the daemon to finish its work and exit; raise if it exited with an error.

        ``TimeoutError`` when it is still running after ``timeout`` seconds.
        """
        if self._proc is None:
            raise RuntimeError(f"{self._command} was not started")
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self._command} (pid {self._proc.pid}) still running after {timeout} s") from None
        if code != 0:
            raise self._failure(f"{self._command} exited with status {code}")
        return code

    def stop(self, grace: float = 5.0) -> int | None:
        """Stop the daemon if it still runs (SIGTERM, then SIGKILL after ``grace``) and reap it.

        Idempotent; returns the exit status (``None`` if it was never started).
        """
        proc, self._proc = self._proc, None
        code = stop_process(proc, grace) if proc is not None else None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return code

    def __enter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"{self._command} context manager cannot be re-entered")
        self._entered = True
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _common_argv(self, opts: PageServerOptions | LazyPagesOptions, status_fd: int) -> list[str]:
        images_dir = os.fspath(opts.images_dir)
        work_dir = os.fspath(opts.work_dir) if opts.work_dir is not None else images_dir
        # INFO at least: the real port of a port-0 page server is read from the log.
        level = max(int(opts.log_level), int(LogLevel.INFO))
        return [self.binary, self._command, "--images-dir", images_dir, "--work-dir", work_dir,
                "--log-file", opts.log_file, f"-v{level}", "--status-fd", str(status_fd)]

    @staticmethod
    def _tls_argv(opts: PageServerOptions | LazyPagesOptions) -> list[str]:
        argv: list[str] = []
        if opts.tls:
            argv.append("--tls")
        for flag, value in (("--tls-cacert", opts.tls_cacert), ("--tls-cacrl", opts.tls_cacrl),
                            ("--tls-cert", opts.tls_cert), ("--tls-key", opts.tls_key)):
            if value is not None:
                argv += [flag, os.fspath(value)]
        if opts.tls_no_cn_verify:
            argv.append("--tls-no-cn-verify")
        return argv


class PageServer(_NativeDaemon):
    """``criu page-server``: receives the pages of a dump into ``images_dir``, or, with
    ``lazy_pages``, serves the pages of a local dump to a remote ``criu lazy-pages``.

    ::

        with criu.page_server(PageServerOptions(images_dir=d, port=0)) as ps:
            criu.dump(DumpOptions(pid=pid, images_dir=src,
                                  page_server=PageServerAddress("127.0.0.1", ps.port)))
            ps.wait(timeout=60)   # exits once the dump has sent everything
    """

    _error = PageServerError
    _command = "page-server"

    def __init__(self, opts: PageServerOptions, *, binary: str) -> None:
        super().__init__(binary, opts.log_path, opts.timeout)
        self.opts = opts
        self._port = opts.port
        for name, path in (("images_dir", opts.images_dir), ("work_dir", opts.work_dir)):
            if path is not None and not os.path.isdir(path):
                raise InvalidOptionError(f"page server {name} {path!r} is not an existing directory")

    @property
    def port(self) -> int:
        """The TCP port the page server listens on (the real one when started with ``port=0``)."""
        return self._port

    @property
    def address(self) -> PageServerAddress:
        """Where a dump (or a lazy-pages daemon) reaches this page server."""
        return PageServerAddress(self.opts.address, self._port)

    def _argv(self, status_fd: int) -> list[str]:
        o = self.opts
        argv = self._common_argv(o, status_fd)
        argv += ["--address", o.address]
        if o.port:  # CRIU refuses `--port 0`; without --port it binds a free port and logs it
            argv += ["--port", str(o.port)]
        if o.lazy_pages:
            argv.append("--lazy-pages")
        return argv + self._tls_argv(o)

    def _status_fd(self) -> int | None:
        return self.opts.status_fd

    def _on_ready(self) -> None:
        if self._port == 0:
            match = _PORT_LINE.search(self.log_path.read_text(errors="replace"))
            if match is None:
                raise self._failure("page server is ready but its log does not say which port it took")
            self._port = int(match.group(1))


class LazyPages(_NativeDaemon):
    """``criu lazy-pages``: on the destination, fills the page faults of a lazily restored tree
    through userfaultfd, with pages from a remote page server (or local page images).

    Start it after the non-page images are in ``images_dir`` and before
    ``restore(RestoreOptions(..., lazy_pages=True))`` with the same ``work_dir``: the restore
    connects to it through ``lazy-pages.socket`` there. It exits once every page is in place.
    """

    _error = LazyPagesError
    _command = "lazy-pages"

    def __init__(self, opts: LazyPagesOptions, *, binary: str) -> None:
        super().__init__(binary, opts.log_path, opts.timeout)
        self.opts = opts
        images = Path(opts.images_dir)
        if not (images / "pstree.img").exists():
            raise InvalidOptionError(
                f"lazy-pages needs the dump's images in {images} (no pstree.img there)",
                hint="copy the non-page images of a lazy dump there first")

    def _status_fd(self) -> int | None:
        return self.opts.status_fd

    def _argv(self, status_fd: int) -> list[str]:
        o = self.opts
        argv = self._common_argv(o, status_fd)
        if o.page_server is not None:
            argv += ["--page-server", "--address", o.page_server.address, "--port", str(o.page_server.port)]
        return argv + self._tls_argv(o)
