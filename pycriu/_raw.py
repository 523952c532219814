"""The raw layer: the only module that touches the compiled ``pycriu._libcriu`` (``ffi``/``lib``).

It owns three things:

* :class:`RawOpts`, the owner of one ``criu_opts`` (libcriu's per-operation ``criu_local_*`` API),
  freed on every path;
* :func:`check`, the single error path: every libcriu return goes through it and becomes the
  right :mod:`pycriu.errors` exception with errno, CRIU's first error line and the log path;
* the notify / pre-dump-iteration callbacks.

How a notify callback makes the round trip (after pygit2's ``callbacks.py``):

1. :meth:`RawOpts.run` stores the operation's Python handler in a thread-local slot and
   registers the C trampoline ``_pycriu_notify_cb`` with ``criu_local_set_notify_cb``. libcriu's
   callback has no user-data pointer, but it runs synchronously in the calling thread, so the
   thread-local slot identifies the operation.
2. The operation runs with the GIL released. When CRIU reaches a notification point
   (``pre-dump``, ``post-dump``, ...), libcriu calls the trampoline in this thread; cffi takes the
   GIL and the trampoline calls the handler with the action name and the pid.
3. The handler's answer becomes CRIU's answer: ``None``/``True`` is success (0), ``False`` is
   failure (1). If the handler raises, the exception is stored and CRIU is answered with failure,
   so a ``post-dump`` that raises resumes the dumped tree instead of killing it.
4. When the libcriu call returns, :meth:`RawOpts.run` re-raises the stored exception (it wins over
   the libcriu error it caused), raises the operation's error when a handler answered ``False``
   (libcriu then returns a positive 1, not an error code), or passes the return code to
   :func:`check`.
"""

from __future__ import annotations

import errno as _errno
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _pids, _threads, errors
from ._libcriu import ffi, lib

NotifyHandler = Callable[[str, int], "bool | None"]
MoreHandler = Callable[[], bool]

#: The C constants the Pythonic enums are built from (nothing above this module reads ``lib``).
CONSTANTS: dict[str, int] = {
    name: getattr(lib, name)
    for name in dir(lib)
    if name.startswith(("CRIU_LOG_", "CRIU_CG_MODE_", "CRIU_NETWORK_LOCK_", "CRIU_PRE_DUMP_", "CLONE_NEW"))
}

#: The libcriu this extension was compiled against (from criu/version.h).
COMPILED_VERSION = (lib.CRIU_VERSION_MAJOR, lib.CRIU_VERSION_MINOR)

#: What the libcriu this extension was built against lacks: setter -> the libcriu version that
#: has it (empty for libcriu 4.2; Debian 12's 3.17 lacks these). The configuration file is never
#: among them: on 3.17 the extension sets the request's field itself (csrc/build_ffi.py).
MISSING_SETTERS: dict[str, str] = {
    setter: "4.2"
    for setter, has in (("set_empty_ns", lib.PYCRIU_HAS_EMPTY_NS),
                        ("set_skip_file_rwx_check", lib.PYCRIU_HAS_SKIP_FILE_RWX_CHECK))
    if not has
}
#: libcriu knows CRIU_NETWORK_LOCK_SKIP (``--network-lock skip``, 4.2)
HAS_NETWORK_LOCK_SKIP = bool(lib.PYCRIU_HAS_NETWORK_LOCK_SKIP)


def unsupported(what: str, version: str) -> errors.CriuVersionError:
    """The error for a feature the libcriu of this build lacks."""
    built = ".".join(map(str, COMPILED_VERSION))
    return errors.CriuVersionError(
        f"{what} needs libcriu >= {version}; this pycriu was built against libcriu {built}",
        hint=f"build pycriu against a CRIU >= {version} (scripts/provision.sh installs 4.2.1), "
             "or leave the option unset")


#: The directory libcriu was linked from at build time ("" if unknown).
BUILD_LIBDIR: str = ffi.string(lib.pycriu_build_libdir()).decode()

_ERROR_CLASS: dict[str, type[errors.CriuError]] = {
    "check": errors.CheckError,
    "dump": errors.DumpError,
    "pre-dump": errors.PreDumpError,
    "restore": errors.RestoreError,
}


def check(rc: int, operation: str, *, log_path: str | None = None, err: int | None = None) -> int:
    """Return ``rc`` when it means success (``>= 0``); otherwise raise the matching typed error.

    libcriu returns a negative errno for its own failures (``-EBADE``: CRIU said no;
    ``-ECONNREFUSED``/``-ECOMM``/``-EBADMSG``: the ``criu swrk`` child could not be reached or
    spoke garbage; ``-EINVAL``/``-ENOMEM``: bad arguments) and leaves CRIU's errno in ``errno``.
    """
    if rc >= 0:
        return rc
    code = -rc
    cr_errno = err if err else None
    criu_message = errors.first_error_line(log_path)
    base = _ERROR_CLASS.get(operation, errors.CriuError)
    cls: type[errors.CriuError] = base
    if code in (_errno.ECONNREFUSED, _errno.ECOMM, _errno.EBADMSG):
        cls = errors.ServiceError
    elif code == _errno.EINVAL:
        cls = errors.InvalidOptionError
    elif code == _errno.ENOMEM:
        raise MemoryError(f"libcriu: out of memory during {operation}")
    message = criu_message or ""
    if cr_errno in (_errno.EPERM, _errno.EACCES) and os.geteuid() != 0:
        cls = errors.CriuPermissionError
    elif cr_errno == _errno.ESRCH or "No such process" in message:
        cls = errors.NoSuchProcessError
    elif _pids.pid_clash(message) is not None:
        cls = errors.PidInUseError
    elif "Tracking memory is not available" in message or "Dirty tracking is OFF" in message:
        cls = errors.KernelUnsupportedError
    what = {
        _errno.EBADE: "CRIU reported a failure",
        _errno.ECONNREFUSED: "could not start or reach `criu swrk`",
        _errno.ECOMM: "lost the connection to `criu swrk`",
        _errno.EBADMSG: "`criu swrk` sent a malformed reply",
        _errno.EINVAL: "libcriu refused the request",
    }.get(code, os.strerror(code))
    raise cls(
        f"{operation} failed: {what}",
        operation=operation,
        errno=cr_errno if cr_errno else code,
        criu_message=criu_message,
        log_path=log_path,
    )


@dataclass
class _CallbackState:
    notify: NotifyHandler | None = None
    more: MoreHandler | None = None
    exc: BaseException | None = None
    refused: str | None = None  # the action a handler answered False to


_tls = threading.local()

def _current() -> _CallbackState | None:
    return getattr(_tls, "state", None)


def _store_exc(exc_type: type[BaseException], exc: BaseException, tb: Any) -> int:
    state = _current()
    if state is not None and state.exc is None:
        state.exc = exc
    return 1


@ffi.def_extern(onerror=_store_exc)
def _pycriu_notify_cb(action: Any, na: Any) -> int:
    state = _current()
    if state is None or state.notify is None:
        return 0
    if state.exc is not None:  # an earlier callback failed: keep answering failure
        return 1
    name = ffi.string(action).decode()
    pid = lib.criu_notify_pid(na) if na != ffi.NULL else 0
    try:
        answer = state.notify(name, pid)
    except BaseException as exc:  # noqa: BLE001 - re-raised by RawOpts.run after CRIU answered
        state.exc = exc
        return 1
    if answer is False:
        state.refused = name
        return 1
    return 0


@ffi.def_extern(onerror=_store_exc)
def _pycriu_more_cb(pi: Any) -> int:
    # 1: another pre-dump; 0: the final dump; < 0: stop with neither (libcriu's dump_iters then
    # returns that value, and the tree, only pre-dumped, runs on). A handler that raised must stop:
    # answering 0 would make CRIU dump the tree, and kill it, before the exception is re-raised.
    state = _current()
    if state is None or state.more is None or state.exc is not None:
        return -1
    try:
        return 1 if state.more() else 0
    except BaseException as exc:  # noqa: BLE001 - re-raised by RawOpts.run
        state.exc = exc
        return -1


def orphan_pts_master_fd() -> int:
    """The pts master fd libcriu received with an ``orphan-pts-master`` notification."""
    return lib.criu_get_orphan_pts_master_fd()


def _cstr(value: str | os.PathLike[str]) -> bytes:
    return os.fsencode(value)


class RawOpts:
    """Owner of one libcriu ``criu_opts``: apply setters, run one operation, free on every path.

    Setter names are the libcriu function names without ``criu_local_`` (``"set_pid"``,
    ``"add_external"``); string arguments may be ``str``, ``bytes`` or ``os.PathLike``, and
    ``None`` is passed as ``NULL`` (an optional string: ``add_cg_root``, ``join_ns_add``).
    """

    _ptr: Any = None  # also for __del__ when __init__ failed before the options existed

    def __init__(self) -> None:
        box = ffi.new("criu_opts **")
        check(lib.criu_local_init_opts(box), "init-opts")
        self._ptr = box[0]
        self._keep: list[Any] = []  # cffi buffers that must live as long as the opts

    def close(self) -> None:
        """Free the options; idempotent."""
        if self._ptr is not None:
            lib.pycriu_free_config_file(self._ptr)  # libcriu's free leaves it
            lib.criu_local_free_opts(self._ptr)
            self._ptr = None
            self._keep.clear()

    def __enter__(self) -> RawOpts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _opts(self) -> Any:
        if self._ptr is None:
            raise ValueError("criu options already freed")
        return self._ptr

    def apply(self, setter: str, *args: Any) -> None:
        """Call ``criu_local_<setter>(opts, *args)`` and check its return."""
        fn = getattr(lib, "criu_local_" + setter, None)
        if fn is None:
            raise AttributeError(f"libcriu has no criu_local_{setter}")
        if setter in MISSING_SETTERS:
            raise unsupported(f"criu_local_{setter}", MISSING_SETTERS[setter])
        if setter == "set_network_lock" and not HAS_NETWORK_LOCK_SKIP and args[0] == lib.CRIU_NETWORK_LOCK_SKIP:
            raise unsupported("network_lock=NetworkLockMethod.SKIP", "4.2")
        cargs = [ffi.NULL if a is None else _cstr(a) if isinstance(a, (str, os.PathLike)) else a
                 for a in args]
        if setter == "set_exec_cmd":
            argv = [ffi.new("char[]", _cstr(a)) for a in args[0]]
            self._keep.extend(argv)
            arr = ffi.new("char *[]", argv + [ffi.NULL])
            self._keep.append(arr)
            cargs = [len(argv), arr]
        rc = fn(self._opts(), *cargs)
        if rc is None:
            return
        if (rc == -_errno.ENOMEM and setter == "set_page_server_address_port"
                and lib.pycriu_page_server_set(self._opts())):
            # libcriu (3.17 and 4.2 alike) returns -ENOMEM from this setter even when it succeeded
            return
        check(rc, setter.replace("_", "-"))

    def run(
        self,
        operation: str,
        *,
        log_path: str | None = None,
        notify: NotifyHandler | None = None,
        more: MoreHandler | None = None,
        service_fd: int | None = None,
    ) -> int:
        """Run one libcriu operation (``dump``, ``pre-dump``, ``restore``, ``restore-child``,
        ``dump-iters``, ``check``, ``get-version``) with the GIL released, through :func:`check`.

        ``service_fd`` is a socket to a ``criu swrk`` worker; libcriu closes it when done.
        """
        opts = self._opts()
        if service_fd is not None:
            lib.criu_local_set_service_fd(opts, service_fd)
        state = _CallbackState(notify=notify, more=more)
        if notify is not None:
            lib.criu_local_set_notify_cb(opts, lib._pycriu_notify_cb)
        previous = _current()
        _tls.state = state
        # SIGINT/SIGTERM wait until CRIU has answered: an interrupted recvmsg makes libcriu drop
        # the request half-way, losing the restored tree or the dump's outcome.
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, _threads.SIGNALS)
        interrupted: BaseException | None = None
        try:
            if operation == "dump":
                rc = lib.criu_local_dump(opts)
            elif operation == "pre-dump":
                rc = lib.criu_local_pre_dump(opts)
            elif operation == "restore":
                rc = lib.criu_local_restore(opts)
            elif operation == "restore-child":
                rc = lib.criu_local_restore_child(opts)
            elif operation == "dump-iters":
                rc = lib.criu_local_dump_iters(opts, lib._pycriu_more_cb)
            elif operation == "check":
                rc = lib.criu_local_check(opts)
            elif operation == "get-version":
                rc = lib.criu_local_get_version(opts)
            else:
                raise ValueError(f"unknown libcriu operation {operation!r}")
            err = ffi.errno
        finally:
            _tls.state = previous
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)  # pending handlers run here
            except KeyboardInterrupt as exc:
                interrupted = exc
        if state.exc is not None:
            raise state.exc
        name = "restore" if operation == "restore-child" else "dump" if operation == "dump-iters" else operation
        if state.refused is not None:
            # libcriu returns the handler's positive answer (1) here, which would read as success
            # (or as restored pid 1); CRIU itself treats the refusal as a failure and rolls back.
            raise _ERROR_CLASS.get(name, errors.CriuError)(
                f"{name} aborted: the notify callback answered False to {state.refused!r}",
                operation=name, log_path=log_path)
        if interrupted is not None:
            # CRIU finished; the caller learns what it did from the interrupt's ``criu_return``
            # (or ``criu_error``), and pycriu.Criu turns it into ``result``.
            try:
                interrupted.criu_return = check(rc, name, log_path=log_path, err=err)  # type: ignore[attr-defined]
            except errors.CriuError as failure:
                interrupted.criu_error = failure  # type: ignore[attr-defined]
            raise interrupted
        return check(rc, name, log_path=log_path, err=err)

    def check_version(self, minimum: int) -> bool:
        """``criu_local_check_version``: is the CRIU behind these options at least ``minimum``
        (encoded as ``major*10000 + minor*100 + sublevel``)?"""
        rc = lib.criu_local_check_version(self._opts(), minimum)
        if rc < 0:
            check(rc, "check-version")
        return rc == 1

    def feature_check(self, names: Sequence[str], *, log_path: str | None = None,
                      service_fd: int | None = None) -> dict[str, bool]:
        """``criu_local_feature_check`` for the named fields of ``struct criu_feature_check``."""
        if service_fd is not None:
            lib.criu_local_set_service_fd(self._opts(), service_fd)
        features = ffi.new("struct criu_feature_check *")
        for name in names:
            setattr(features, name, True)
        rc = lib.criu_local_feature_check(self._opts(), features, ffi.sizeof("struct criu_feature_check"))
        err = ffi.errno
        check(rc, "feature-check", log_path=log_path, err=err)
        return {name: bool(getattr(features, name)) for name in names}
