"""``Criu``: dump, pre-dump, restore, check, features and version, one libcriu operation each.

Every operation owns its resources: a ``criu_opts`` (freed on every path), the image/work
directory fds, a private CRIU config file, and the ``criu swrk`` worker. pycriu starts that worker
itself in its own session and hands libcriu the socket (``criu_local_set_service_fd``), so a Ctrl-C
at the terminal reaches Python, not CRIU: CRIU finishes or rolls back the operation (the dumped
tree is resumed, never lost), and ``KeyboardInterrupt`` is raised when it has answered.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

from . import _config, _pids, _raw, _threads, breakpoints
from ._process import stop_process
from .errors import (
    INSTALL_CRIU,
    CheckError,
    CriuError,
    CriuNotFoundError,
    CriuPermissionError,
    CriuVersionError,
    InvalidOptionError,
    KernelUnsupportedError,
    NoSuchProcessError,
    PidInUseError,
    first_error_line,
    hint_for,
    stderr_message,
)
from .options import DumpOptions, LazyPagesOptions, PageServerOptions, PreDumpOptions, RestoreOptions, _CriuOptions
from .results import DumpResult, DumpStats, Features, RestoreResult, RestoreStats, read_stats

if TYPE_CHECKING:
    from .daemons import LazyPages, PageServer

__all__ = ["Criu", "CriuVersion", "find_criu", "MIN_CRIU_VERSION", "required_version"]

#: The oldest CRIU pycriu builds against and drives: Debian 12's own criu package. What 3.17's
#: libcriu lacks is refused per option (:data:`pycriu._raw.MISSING_SETTERS`).
MIN_CRIU_VERSION = (3, 17)


#: The first CRIU whose worker answers libcriu's check request (older ones: ``criu check``).
_RPC_CHECK_WORKS = (4, 2)


def required_version() -> tuple[int, int]:
    """The oldest ``criu`` binary this build drives: the libcriu it was compiled against, and
    never below :data:`MIN_CRIU_VERSION`. An older binary would silently ignore the RPC fields
    its libcriu sends and it does not know."""
    return max(MIN_CRIU_VERSION, _raw.COMPILED_VERSION)

_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class _PreDumpChain:
    """The directories of :meth:`Criu.dump_iterations`. libcriu sends the same options for every
    round, so the images directory and the parent are switched on them between the rounds, from
    the ``more`` callback (it runs in the calling thread, between two requests): pre-dump N into
    ``pre-N`` (parent ``../pre-(N-1)``), the dump into the images directory (parent ``pre-N``)."""

    def __init__(self, images_dir: Path, more: Callable[[], bool]) -> None:
        self.images_dir = images_dir
        self.more = more
        self.rounds = 0
        self._fds: list[int] = []

    def start(self, raw: _raw.RawOpts) -> Callable[[], bool]:
        """Point ``raw`` at the first pre-dump; return the callback libcriu asks between rounds."""
        self._next_pre_dump(raw)

        def between_rounds() -> bool:
            again = self.more()
            if again:
                self._next_pre_dump(raw)
            else:
                self._point(raw, self.images_dir, f"pre-{self.rounds}")
            return again

        return between_rounds

    def _next_pre_dump(self, raw: _raw.RawOpts) -> None:
        self.rounds += 1
        d = self.images_dir / f"pre-{self.rounds}"
        d.mkdir()
        self._point(raw, d, f"../pre-{self.rounds - 1}" if self.rounds > 1 else None)

    def _point(self, raw: _raw.RawOpts, images: Path, parent: str | None) -> None:
        fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
        self._fds.append(fd)  # open until the run ends: CRIU opens it through /proc/<us>/fd
        raw.apply("set_images_dir_fd", fd)
        if parent is not None:
            raw.apply("set_parent_images", parent)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


class CriuVersion(NamedTuple):
    """CRIU's version; a tuple, so ``criu.version() >= (4, 2)`` works."""

    major: int
    minor: int
    sublevel: int = 0

    @classmethod
    def from_code(cls, code: int) -> CriuVersion:
        """Decode libcriu's ``major*10000 + minor*100 + sublevel``."""
        return cls(code // 10000, code // 100 % 100, code % 100)

    @classmethod
    def parse(cls, text: str) -> CriuVersion:
        """``"4.2"`` or ``"4.2.1"`` (what ``str()`` gives, and what agents exchange); raises
        :class:`ValueError` naming the text otherwise."""
        parts = str(text).split(".")
        if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a CRIU version (expected MAJOR.MINOR[.SUBLEVEL])")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"


def find_criu(binary: str | os.PathLike[str] | None = None) -> str:
    """Resolve the ``criu`` binary: ``binary``, then ``$PYCRIU_CRIU``, then ``PATH`` and the sbin
    directories. Raises :class:`CriuNotFoundError` naming where it looked."""
    candidate = binary if binary is not None else os.environ.get("PYCRIU_CRIU")
    if candidate is not None:
        path = os.fspath(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise CriuNotFoundError(
            f"criu binary {path!r} does not exist or is not executable",
            hint=f"pass the path of a CRIU >= 4.2 binary, or {INSTALL_CRIU}")
    search = os.pathsep.join([os.environ.get("PATH", ""), *_install_sbin_dirs(), *_SEARCH_PATH])
    found = shutil.which("criu", path=search)
    if found is None:
        raise CriuNotFoundError(
            "criu binary not found in PATH or the sbin directories",
            hint=INSTALL_CRIU)
    return found


def _install_sbin_dirs() -> list[str]:
    """The sbin/bin directories of the CRIU install whose libcriu the extension was built against
    (``PREFIX/lib/<multiarch>`` -> ``PREFIX/sbin``), so a CRIU provisioned under another prefix is
    found without PATH changes."""
    dirs: list[str] = []
    libdir = Path(_raw.BUILD_LIBDIR) if _raw.BUILD_LIBDIR else None
    for parent in (libdir.parents if libdir is not None else ()):
        if parent.name.startswith("lib"):
            continue
        dirs += [str(parent / "sbin"), str(parent / "bin")]
        break
    return dirs


class Criu:
    """Entry point to CRIU through libcriu.

    ``binary`` is the ``criu`` executable libcriu's worker runs (default: found on ``PATH``).
    One ``Criu`` object may run many operations, from several threads; each operation has its own
    options and worker.
    """

    def __init__(self, binary: str | os.PathLike[str] | None = None) -> None:
        self.binary = find_criu(binary)
        self._features: Features | None = None
        self._version: CriuVersion | None = None
        self._spare: _Spawned | None = None
        self._spare_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Criu(binary={self.binary!r})"

    # -- the worker and one operation ------------------------------------------------------------

    def _spawn(self, show_output: bool, pass_fds: tuple[int, ...] = ()) -> _Spawned:
        """Start ``criu swrk`` in its own session, on one end of a new socket pair; ``pass_fds``
        (the options' own fds: inherited fds, a pidfd store socket) keep their numbers in it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # CRIU reports what fails before its log is open (a bad config-file option) on stderr.
        stderr = tempfile.TemporaryFile()
        try:
            with _threads.children_get_signals():
                proc = subprocess.Popen(
                    [self.binary, "swrk", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(), *pass_fds),
                    stdin=subprocess.DEVNULL,
                    stdout=None if show_output else subprocess.DEVNULL,  # `criu check` prints "Looks good." there
                    stderr=stderr,
                    start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            stderr.close()
            raise CriuNotFoundError(f"cannot start {self.binary} swrk: {exc}") from exc
        finally:
            theirs.close()
        return _Spawned(ours, proc, stderr)

    def prestart(self) -> None:
        """Start the ``criu swrk`` worker of this object's next operation now, so that the
        operation does not wait for it (2 to 3 ms: an agent does this before the source freezes,
        for the restore inside the downtime). Idle, it waits on its socket;
        :meth:`discard_prestarted` stops it if no operation came."""
        spare = self._spawn(show_output=False)
        with self._spare_lock:
            old, self._spare = self._spare, spare
        if old is not None:
            old.close()

    def discard_prestarted(self) -> None:
        """Stop the worker :meth:`prestart` started, if no operation used it."""
        with self._spare_lock:
            old, self._spare = self._spare, None
        if old is not None:
            old.close()

    @contextmanager
    def _worker(self, *, show_output: bool = False, pass_fds: tuple[int, ...] = ()) -> Iterator[socket.socket]:
        """A ``criu swrk`` in its own session (the prestarted one if any); yield our end of its
        socket.

        CRIU's stdout is discarded unless ``show_output`` (``display_stats``: CRIU prints the
        statistics there, as ``criu dump --display-stats`` does), then it is ours.

        Hand the socket to libcriu with ``sock.detach()`` right before the operation: libcriu
        closes it when done. If the operation never ran, the socket is closed here, so the worker
        sees EOF and exits. The worker is reaped on every path (killed if it outlives its socket
        by 30 s).
        """
        spawned = None
        if not show_output and not pass_fds:  # the prestarted worker has none of the options' fds
            with self._spare_lock:
                spawned, self._spare = self._spare, None
            if spawned is not None and spawned.proc.poll() is not None:  # it died meanwhile
                spawned.close()
                spawned = None
        if spawned is None:
            spawned = self._spawn(show_output, pass_fds)
        ours, proc, stderr = spawned.sock, spawned.proc, spawned.stderr
        try:
            yield ours
        except CriuError as exc:
            ours.close()
            _reap(proc)
            if exc.criu_message is None:
                exc.criu_message = stderr_message(stderr)
                exc.hint = exc.hint or hint_for(exc)
            raise
        finally:
            ours.close()  # no-op once detached
            _reap(proc)
            stderr.close()

    @contextmanager
    def _log_opts(self, log_dir: str, log_name: str) -> Iterator[_raw.RawOpts]:
        """Options for an operation that only needs a log (check, feature check)."""
        with ExitStack() as stack:
            raw = stack.enter_context(_raw.RawOpts())
            fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fd)
            raw.apply("set_work_dir_fd", fd)
            raw.apply("set_images_dir_fd", fd)
            raw.apply("set_log_file", log_name)
            yield raw

    def _run(self, operation: str, opts: _CriuOptions, raw_operation: str,
             iterations: _PreDumpChain | None = None) -> int:
        _require_root(operation)
        self._require_supported()
        images_dir = _existing_dir(opts.images_dir, "images_dir")
        work_dir = _existing_dir(opts.work_dir, "work_dir") if opts.work_dir is not None else images_dir
        log_path = opts.log_path
        fds = opts.passed_fds()
        for fd in fds:  # before this opens fds of its own, which could take a closed one's number
            _check_open_fd(fd)
        log_path.unlink(missing_ok=True)  # CRIU truncates it anyway; never read a stale error
        with ExitStack() as stack:
            images_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, images_fd)
            work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, work_fd)
            raw = stack.enter_context(_raw.RawOpts())
            cfg = stack.enter_context(_config.config_file(opts.config_entries()))
            # CRIU stops the tasks at hardware breakpoints: their first one must not wait for the
            # kernel's perf hooks while the tree is frozen (pycriu.breakpoints)
            stack.enter_context(breakpoints.Warm())
            raw.apply("set_images_dir_fd", images_fd)
            raw.apply("set_work_dir_fd", work_fd)
            raw.apply("set_log_file", opts.log_name)
            for setter, args in opts.setter_calls():
                raw.apply(setter, *args)
            if cfg is not None:
                raw.apply("set_config_file", cfg)
            more = None
            if iterations is not None:
                stack.callback(iterations.close)
                more = iterations.start(raw)
            if raw_operation == "restore-child":
                # libcriu's restore_child always spawns its own worker, `criu` from PATH, so that
                # the restored tree becomes its caller's child: it cannot use ours. That worker
                # inherits what is inheritable: the options' fds are, for the call.
                stack.enter_context(_inheritable(fds))
                return raw.run(raw_operation, log_path=str(log_path), notify=opts.notify)
            worker = stack.enter_context(self._worker(show_output=bool(opts.display_stats), pass_fds=fds))
            return raw.run(raw_operation, log_path=str(log_path), notify=opts.notify, more=more,
                           service_fd=worker.detach())

    # -- information -----------------------------------------------------------------------------

    def version(self) -> CriuVersion:
        """CRIU's version, asked from the ``criu`` binary through libcriu."""
        with _raw.RawOpts() as raw, self._worker() as worker:
            return CriuVersion.from_code(raw.run("get-version", service_fd=worker.detach()))

    def _require_supported(self) -> None:
        """Once per object: refuse a CRIU older than pycriu needs, before it is asked anything else
        (an old CRIU fails later in confusing ways, for example on newer kernels' vDSO)."""
        self.supported_version()

    def supported_version(self) -> CriuVersion:
        """CRIU's version, asked once per object; :class:`CriuVersionError` when older than this
        build drives (:func:`required_version`: 4.2 for a build against CRIU 4.2)."""
        if self._version is None:
            self._version = self.require_version()
        return self._version

    def require_version(self, minimum: tuple[int, ...] | None = None) -> CriuVersion:
        """Return the version, or raise :class:`CriuVersionError` when it is below ``minimum``
        (default: :func:`required_version`)."""
        minimum = required_version() if minimum is None else minimum
        version = self.version()
        if version < minimum:
            raise CriuVersionError(
                f"CRIU {version} at {self.binary} is older than {'.'.join(map(str, minimum))}",
                hint=INSTALL_CRIU)
        return version

    def check(self) -> bool:
        """Run ``criu check``: True when checkpoint/restore works here, else :class:`CheckError`
        (whose ``log_path`` is kept for reading)."""
        _require_root("check")
        self._require_supported()
        with self._scratch_log("check") as (tmp, log):
            if self.supported_version() < _RPC_CHECK_WORKS:
                self._check_command(tmp, log)
            else:
                with self._log_opts(tmp, "check.log") as raw, self._worker() as worker:
                    raw.run("check", log_path=log, service_fd=worker.detach())
        return True

    def _check_command(self, tmp: str, log: str) -> None:
        """``criu check`` as a command: before CRIU 4.2 its worker crashed on libcriu's check
        request, which carries no options (a NULL dereference in setup_opts_from_req, fixed by
        CRIU's commit 9371c4a7 for issue #2758), so the check always failed with no log."""
        with tempfile.TemporaryFile() as stderr:
            try:
                done = subprocess.run([self.binary, "check", "-W", tmp, "-o", os.path.basename(log), "-v2"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CheckError(f"check failed: cannot run {self.binary} check: {exc}", operation="check",
                                 log_path=log) from None
            if done.returncode != 0:
                error = CheckError(f"check failed: {self.binary} check exited with status {done.returncode}",
                                   operation="check", criu_message=first_error_line(log) or stderr_message(stderr),
                                   log_path=log)
                error.hint = error.hint or hint_for(error)
                raise error

    def features(self, *, refresh: bool = False) -> Features:
        """Which optional features (memory tracking, lazy pages, pidfd store) work here. Cached."""
        if self._features is None or refresh:
            _require_root("feature check")
            self._require_supported()
            with self._scratch_log("features") as (tmp, log):
                with self._log_opts(tmp, "features.log") as raw, self._worker() as worker:
                    found = raw.feature_check(["mem_track", "lazy_pages", "pidfd_store"],
                                              log_path=log, service_fd=worker.detach())
            self._features = Features(mem_track=found["mem_track"], lazy_pages=found["lazy_pages"],
                                      pidfd_store=found["pidfd_store"])
        return self._features

    @staticmethod
    @contextmanager
    def _scratch_log(name: str) -> Iterator[tuple[str, str]]:
        """A temporary log directory, removed on success and kept when the operation failed
        (unless CRIU wrote no log there: then there is nothing to read, and it is removed too)."""
        tmp = tempfile.mkdtemp(prefix=f"pycriu-{name}-")
        log = os.path.join(tmp, f"{name}.log")
        try:
            yield tmp, log
        except CriuError as err:
            if not os.path.exists(log):
                shutil.rmtree(tmp, ignore_errors=True)
                if err.log_path == log:
                    err.log_path = None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)

    # -- operations ------------------------------------------------------------------------------

    def dump(self, opts: DumpOptions) -> DumpResult:
        """Checkpoint the tree rooted at ``opts.pid`` into ``opts.images_dir``.

        By default CRIU kills the tree after a successful dump (``leave_running`` /
        ``leave_stopped`` change that). On failure, or when the ``post-dump`` notify callback
        answers ``False`` or raises, CRIU resumes the tree and an error is raised.
        """
        if not isinstance(opts, DumpOptions) or isinstance(opts, PreDumpOptions):
            raise InvalidOptionError("dump() takes DumpOptions")
        _require_pid(opts.pid)
        if opts.track_mem:
            self._require_mem_track("dump with track_mem")
        with _interrupt_result(lambda rc: self._dump_result(opts)):
            self._run("dump", opts, "dump")
        return self._dump_result(opts)

    def pre_dump(self, opts: PreDumpOptions) -> DumpResult:
        """Pre-dump memory while the tree keeps running; needs kernel memory tracking.

        Refused with :class:`KernelUnsupportedError` before CRIU runs when the kernel cannot track
        dirty memory (CRIU would abort otherwise).
        """
        if not isinstance(opts, PreDumpOptions):
            raise InvalidOptionError("pre_dump() takes PreDumpOptions")
        _require_pid(opts.pid)
        self._require_mem_track("pre-dump")
        with _interrupt_result(lambda rc: self._dump_result(opts)):
            self._run("pre-dump", opts, "pre-dump")
        return self._dump_result(opts)

    def dump_iterations(self, opts: DumpOptions, more: Callable[[], bool]) -> DumpResult:
        """libcriu's ``dump_iters``: pre-dump, and again while ``more()`` answers true (the tree
        runs meanwhile), then dump. Needs memory tracking.

        Pre-dump N goes into ``images_dir/pre-N`` with ``pre-(N-1)`` as its parent, and the final
        dump into ``images_dir`` with the last pre-dump as its parent, so each writes only the
        pages written since the one before; restore from ``images_dir`` as from any dump. If
        ``more`` raises, neither another pre-dump nor the dump runs: the tree runs on and the
        exception is re-raised. ``track_mem`` is implied; ``parent_images`` cannot be given.
        """
        if opts.track_mem is False:
            raise InvalidOptionError("dump_iterations tracks memory between its rounds: track_mem=False "
                                     "contradicts it", hint="leave track_mem unset")
        if opts.parent_images is not None:
            raise InvalidOptionError("dump_iterations chains its own pre-dumps: parent_images cannot be given",
                                     hint="pre-dump with Criu.pre_dump yourself to start from earlier images")
        _require_pid(opts.pid)
        images_dir = Path(_existing_dir(opts.images_dir, "images_dir"))
        earlier = sorted(p.name for p in images_dir.glob("pre-*"))
        if earlier:
            raise InvalidOptionError(f"images_dir {images_dir} already holds pre-dumps ({', '.join(earlier)})",
                                     hint="give dump_iterations an empty directory")
        self._require_mem_track("iterative dump")
        opts = replace(opts, track_mem=True)
        with _interrupt_result(lambda rc: self._dump_result(opts)):
            self._run("dump", opts, "dump-iters", iterations=_PreDumpChain(images_dir, more))
        return self._dump_result(opts)

    def restore(self, opts: RestoreOptions) -> RestoreResult:
        """Restore the tree dumped in ``opts.images_dir``; returns its root pid and statistics.

        The tree gets its dumped PIDs back. When one is taken and nothing in ``/proc`` holds it
        (right after the tree's dump on this host, for a moment), the restore runs again, up to
        10 times 100 ms apart (:attr:`RestoreResult.attempts`; not with ``lazy_pages``); a
        ``notify`` callback then sees the new run's notifications from its start. When a
        visible process holds it, :class:`PidInUseError` names that process at once."""
        if not isinstance(opts, RestoreOptions):
            raise InvalidOptionError("restore() takes RestoreOptions")
        images = Path(opts.images_dir)
        if not (images / "inventory.img").exists():  # a new directory would only lead to this
            what = "holds no CRIU dump (no inventory.img)" if images.is_dir() else "does not exist"
            raise InvalidOptionError(f"images_dir {images} {what}",
                                     hint="pass the directory a dump wrote its images to (it holds inventory.img)")
        if opts.restore_sibling:
            on_path = shutil.which("criu")
            if on_path is None or os.path.realpath(on_path) != os.path.realpath(self.binary):
                raise InvalidOptionError(
                    f"restore_sibling runs `criu` from PATH ({on_path or 'not found'}), not {self.binary}",
                    hint="put the directory of this criu first in PATH, or restore without restore_sibling")
        attempts = 0

        def attempt() -> int:
            nonlocal attempts
            attempts += 1
            with _interrupt_result(lambda pid: self._restore_result(opts, pid, attempts)):
                return self._run("restore", opts, "restore-child" if opts.restore_sibling else "restore")

        try:
            # One of the tree's PIDs taken by nothing visible, right after its dump on this host,
            # is a moment's state (pycriu._pids): tried again. Not for lazy pages: the daemon
            # serves one restore only.
            pid = attempt() if opts.lazy_pages else _pids.retry_pid_clash(attempt)
        except PidInUseError as exc:
            clash = _pids.pid_clash(exc.criu_message)
            held = _pids.holders(clash) if clash else []  # 0: a thread's id, not named
            if held:
                exc.hint = f"{'; '.join(held)}. {exc.hint}" if exc.hint else "; ".join(held)
            elif attempts > 1:
                exc.message += f" (after {attempts} attempts, {attempts - 1} of them after this PID was seen free)"
            raise
        return self._restore_result(opts, pid, attempts)

    @staticmethod
    def _restore_result(opts: RestoreOptions, pid: int, attempts: int = 1) -> RestoreResult:
        stats = read_stats(Path(opts.work_dir or opts.images_dir) / "stats-restore")
        return RestoreResult(pid=pid, log_path=opts.log_path,
                             stats=stats if isinstance(stats, RestoreStats) else None, attempts=attempts)

    def page_server(self, opts: PageServerOptions) -> PageServer:
        """CRIU's page server as a context manager (see :class:`pycriu.PageServer`)."""
        from .daemons import PageServer

        return PageServer(opts, binary=self.binary)

    def lazy_pages(self, opts: LazyPagesOptions) -> LazyPages:
        """CRIU's lazy-pages daemon as a context manager (see :class:`pycriu.LazyPages`)."""
        from .daemons import LazyPages

        if not self.features().lazy_pages:
            raise KernelUnsupportedError(
                "lazy pages are not supported here (userfaultfd missing or restricted)",
                operation="lazy-pages")
        return LazyPages(opts, binary=self.binary)

    @staticmethod
    def orphan_pts_master_fd() -> int:
        """The master fd of an orphaned pty, valid only inside a notify callback answering
        ``orphan-pts-master`` (restore with ``orphan_pts_master=True``). Dup it to keep it."""
        return _raw.orphan_pts_master_fd()

    # -- helpers ---------------------------------------------------------------------------------

    def _require_mem_track(self, what: str) -> None:
        if not self.features().mem_track:
            raise KernelUnsupportedError(
                f"{what} needs dirty-memory tracking, which this kernel lacks "
                "(CONFIG_MEM_SOFT_DIRTY is not set)",
                operation=what,
                hint="use a flow without pre-dump (classic, page-server or lazy)")

    def _dump_result(self, opts: DumpOptions) -> DumpResult:
        # CRIU 4.2 resets its dump statistics when a lazy dump starts serving pages
        # (init_stats in cr_page_server): the stats-dump it then writes holds garbage times and
        # no pages. Report none rather than wrong numbers.
        if opts.lazy_pages:
            return DumpResult(images_dir=Path(opts.images_dir), log_path=opts.log_path, stats=None)
        stats = read_stats(Path(opts.work_dir or opts.images_dir) / "stats-dump")
        return DumpResult(images_dir=Path(opts.images_dir), log_path=opts.log_path,
                          stats=stats if isinstance(stats, DumpStats) else None)


@contextmanager
def _interrupt_result(make: Callable[[int], object]) -> Iterator[None]:
    """A Ctrl-C that arrived while CRIU worked is raised once CRIU has answered; attach what the
    operation achieved as ``result`` (a DumpResult / RestoreResult: the restored tree's pid is
    never lost) or ``error`` (the CriuError it ended with)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if hasattr(exc, "criu_return"):
            exc.result = make(exc.criu_return)  # type: ignore[attr-defined]
        if hasattr(exc, "criu_error"):
            exc.error = exc.criu_error  # type: ignore[attr-defined]
        raise


@dataclass
class _Spawned:
    """A started ``criu swrk``: our end of its socket, the process, its captured stderr."""

    sock: socket.socket
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]

    def close(self) -> None:
        """Close our end (the worker exits on EOF), reap it, drop its stderr."""
        self.sock.close()
        _reap(self.proc)
        self.stderr.close()


def _check_open_fd(fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise InvalidOptionError(f"fd {fd} given to CRIU is not open in this process",
                                 hint="pass an fd this process holds open (InheritFd(fd, key), pidfd_store_sk)",
                                 ) from None


@contextmanager
def _inheritable(fds: tuple[int, ...]) -> Iterator[None]:
    """``fds`` inheritable (no close-on-exec) inside the block, as they were after it."""
    before = [(fd, os.get_inheritable(fd)) for fd in fds]
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        yield
    finally:
        for fd, was in before:
            os.set_inheritable(fd, was)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a worker whose socket is closed; kill it if it lingers for 30 s."""
    stop_process(proc, 30, ask=None)


def _require_root(operation: str) -> None:
    if os.geteuid() != 0:
        raise CriuPermissionError(
            f"{operation} needs root: checkpoint/restore uses CAP_SYS_ADMIN, CAP_SYS_PTRACE and "
            "CAP_CHECKPOINT_RESTORE", operation=operation,
            hint="run as root (sudo), or in a container with those capabilities")


def _require_pid(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise NoSuchProcessError(f"no process with pid {pid} to dump", operation="dump",
                                 hint="pass the pid of a running process (the root of the tree)") from None
    except PermissionError:
        pass  # it exists; the root check reports the real problem


def _existing_dir(path: str | os.PathLike[str], name: str) -> str:
    text = os.fspath(path)
    if not os.path.exists(text):
        raise InvalidOptionError(f"{name} {text!r} does not exist", hint=f"create it first (mkdir -p {text})")
    if not os.path.isdir(text):
        raise InvalidOptionError(f"{name} {text!r} is not a directory", hint="pass a directory")
    return text
