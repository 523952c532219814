"""Every failure reaches the caller as a typed :class:`pycriu.CriuError` that says what to do.

Each error here is provoked by real bad input or a real CRIU failure, never by a mock. An error
carries the operation, the errno, CRIU's own first error line (read from its log), the log path and
a hint; it is also an instance of the matching built-in exception where one exists, and it pickles.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FEATURES, needs_root

import pycriu
from pycriu.workload import Workload

WorkloadFactory = Callable[..., Workload]


@pytest.fixture
def not_a_session_leader() -> Iterator[int]:
    """The pid of a ``sleep`` whose session leader is a shell of its own (in our PID namespace,
    whatever session the test runner has), so CRIU refuses to dump the sleep on its own."""
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert leader.stdout is not None
    yield int(leader.stdout.readline())
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


@pytest.fixture
def leader_outside_pid_namespace() -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep`` as the init of a new PID namespace but still in the test's session: its session
    leader is outside its PID namespace, which CRIU reports in a different message."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


# --- Refused before CRIU runs -------------------------------------------------------------------


@needs_root
def test_dumping_a_process_that_does_not_exist(criu: pycriu.Criu, images_dir: Path, dead_pid: int) -> None:
    with pytest.raises(pycriu.NoSuchProcessError, match=f"no process with pid {dead_pid}") as info:
        criu.dump(pycriu.DumpOptions(pid=dead_pid, images_dir=images_dir))
    assert isinstance(info.value, ProcessLookupError)
    assert info.value.operation == "dump"
    assert not list(images_dir.iterdir()), "CRIU must not have run"


@needs_root
def test_images_dir_that_does_not_exist(criu: pycriu.Criu, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(pycriu.InvalidOptionError, match="does not exist") as info:
        criu.dump(pycriu.DumpOptions(pid=1, images_dir=missing))
    assert isinstance(info.value, ValueError)
    assert info.value.hint is not None and f"mkdir -p {missing}" in info.value.hint
    # a restore needs a checkpoint, not a new directory: the hint says so (mkdir would only lead
    # to CRIU's "no inventory.img")
    with pytest.raises(pycriu.InvalidOptionError, match="does not exist") as info:
        criu.restore(pycriu.RestoreOptions(images_dir=missing))
    assert info.value.hint is not None and "mkdir" not in info.value.hint and "inventory.img" in info.value.hint
    missing.mkdir()
    with pytest.raises(pycriu.InvalidOptionError, match="holds no CRIU dump"):
        criu.restore(pycriu.RestoreOptions(images_dir=missing))


def test_hints_on_installing_criu_do_not_assume_a_checkout() -> None:
    """A user who installed pycriu with pip has no scripts/provision.sh: the hint says what to
    install and only mentions provisioning for a checkout."""
    from pycriu.errors import INSTALL_CRIU

    with pytest.raises(pycriu.CriuNotFoundError) as info:
        pycriu.Criu("/nonexistent/criu")
    assert info.value.hint is not None and INSTALL_CRIU in info.value.hint
    assert "distribution's criu package" in INSTALL_CRIU and "in a pycriu checkout" in INSTALL_CRIU


@needs_root
def test_images_dir_that_is_a_file(criu: pycriu.Criu, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(pycriu.InvalidOptionError, match="is not a directory"):
        criu.dump(pycriu.DumpOptions(pid=1, images_dir=a_file))


@needs_root
def test_work_dir_that_does_not_exist(criu: pycriu.Criu, images_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="work_dir .* does not exist"):
        criu.dump(pycriu.DumpOptions(pid=1, images_dir=images_dir, work_dir=tmp_path / "nope"))


@pytest.mark.parametrize("port", [-1, 0, 65536, "80", 1.5, True])
def test_page_server_address_needs_a_real_port(port: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="page_server.port"):
        pycriu.PageServerAddress("127.0.0.1", port)  # type: ignore[arg-type]


@needs_root
def test_restoring_from_a_directory_without_a_dump(criu: pycriu.Criu, images_dir: Path) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="no inventory.img"):
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir))


def test_a_criu_binary_that_does_not_exist() -> None:
    with pytest.raises(pycriu.CriuNotFoundError, match="/nonexistent") as info:
        pycriu.Criu(binary="/nonexistent")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.hint is not None


def test_a_criu_binary_that_is_not_executable(tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o644)
    with pytest.raises(pycriu.CriuNotFoundError, match="not executable"):
        pycriu.Criu(binary=fake)


@needs_root
def test_not_root_is_a_permission_error() -> None:
    """Run a real unprivileged process (uid/gid 65534, no groups) that asks CRIU for a check."""
    script = (
        "import pycriu\n"
        "try:\n"
        "    pycriu.Criu().check()\n"
        "except pycriu.CriuError as e:\n"
        "    print(type(e).__name__, isinstance(e, PermissionError), e.operation, sep='|')\n"
        "    print(str(e).replace('\\n', ' '))\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    kind, text = out.stdout.splitlines()
    assert kind == "CriuPermissionError|True|check"
    assert "needs root" in text and "hint: run as root" in text


@needs_root
@pytest.mark.skipif(FEATURES is not None and FEATURES.mem_track,
                    reason="this kernel tracks dirty memory: pre-dump is allowed here")
def test_pre_dump_without_memory_tracking_is_refused_before_criu_runs(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    """Without soft-dirty tracking CRIU's pre-dump aborts ("BUG at criu/mem.c"); pycriu refuses
    it first, and the tree is never touched."""
    w = workload(mib=8)
    with pytest.raises(pycriu.KernelUnsupportedError, match="dirty-memory tracking") as info:
        criu.pre_dump(pycriu.PreDumpOptions(pid=w.pid, images_dir=images_dir))
    assert info.value.operation == "pre-dump"
    assert info.value.hint is not None and "without pre-dump" in info.value.hint
    assert not list(images_dir.iterdir())
    with pytest.raises(pycriu.KernelUnsupportedError):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, track_mem=True))
    with pytest.raises(pycriu.KernelUnsupportedError):
        criu.dump_iterations(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir), more=lambda: False)
    w.wait_beats(2)


# --- Reported by CRIU ---------------------------------------------------------------------------


@needs_root
def test_dump_failure_carries_criu_message_log_and_hint(
        criu: pycriu.Criu, images_dir: Path, not_a_session_leader: int) -> None:
    pid = not_a_session_leader
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=pid, images_dir=images_dir))
    err = info.value

    assert err.operation == "dump"
    assert err.errno == errno.EBADE
    assert err.criu_message is not None and f"root process {pid} is not a session leader" in err.criu_message
    assert err.log_path == str(images_dir / "dump.log")
    assert Path(err.log_path).exists()
    # criu_message is the log's first real error (file:line moved to the end).
    assert err.criu_message.split(" (criu/")[0] in Path(err.log_path).read_text()
    assert err.hint is not None and "shell_job" in err.hint
    # CRIU resumed the tree: the process still runs.
    assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "SR"

    text = str(err)
    assert "dump failed" in text
    assert f"criu: {err.criu_message}" in text
    assert f"log: {err.log_path}" in text
    assert f"hint: {err.hint}" in text


@needs_root
def test_session_leader_outside_the_pid_namespace_is_reported_with_the_same_hint(
        criu: pycriu.Criu, images_dir: Path, leader_outside_pid_namespace: subprocess.Popen[bytes]) -> None:
    """A CI runner or container may put the whole session outside the workload's PID namespace:
    CRIU words that differently, and the hint still says what to do."""
    unshare = leader_outside_pid_namespace.pid
    children = Path(f"/proc/{unshare}/task/{unshare}/children")
    deadline = time.monotonic() + 10
    while not (pid_text := children.read_text().split()) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(pid_text[0])
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=pid, images_dir=images_dir))
    err = info.value
    assert err.errno == errno.EBADE
    assert err.criu_message is not None
    assert f"A session leader of {pid}(1) is outside of its pid namespace" in err.criu_message
    assert err.hint is not None and "shell_job" in err.hint
    assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "SR"


@needs_root
def test_a_value_cannot_inject_an_option_and_criu_s_complaint_is_reported(
        criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    """``cpu-cap`` takes an optional value: written as ``cpu-cap --leave-running`` CRIU would have
    read a second option and left the tree running after the dump. Written as one word, CRIU reads
    the value as the FPU mode and refuses it. It says so on stderr before its log is open: that
    line becomes the error's CRIU message, and the tree was never touched."""
    w = workload(mib=8)
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, criu_options={"cpu-cap": "--leave-running"}))
    assert info.value.criu_message is not None
    assert "Unknown FPU mode `--leave-running'" in info.value.criu_message
    assert not (images_dir / "inventory.img").exists()
    assert w.alive()
    w.wait_beats(2)


@needs_root
def test_restore_failure_on_corrupt_images(criu: pycriu.Criu, images_dir: Path) -> None:
    (images_dir / "inventory.img").write_bytes(b"not a CRIU image at all")
    with pytest.raises(pycriu.RestoreError) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
    assert info.value.operation == "restore"
    assert info.value.criu_message is not None and "inventory.img" in info.value.criu_message
    assert info.value.log_path == str(images_dir / "restore.log")


@needs_root
def test_restoring_a_pid_that_is_in_use(criu: pycriu.Criu, images_dir: Path) -> None:
    """A tree dumped outside any PID namespace must get its pids back. With ``leave_running``
    the original keeps its pid, so the restore collides with it."""
    original = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        criu.dump(pycriu.DumpOptions(pid=original.pid, images_dir=images_dir, leave_running=True))
        t0 = time.monotonic()
        with pytest.raises(pycriu.PidInUseError) as info:
            criu.restore(pycriu.RestoreOptions(images_dir=images_dir))
        assert time.monotonic() - t0 < 5  # a visible holder is not waited for (no 10 attempts)
        assert isinstance(info.value, pycriu.RestoreError)
        assert info.value.criu_message is not None
        assert f"Can't fork for {original.pid}: File exists" in info.value.criu_message
        hint = info.value.hint or ""
        assert f"pid {original.pid} is a process ('sleep', state S" in hint, hint  # who holds it
        assert "PID namespace" in hint
        assert "attempts" not in info.value.message
        assert original.poll() is None
    finally:
        original.kill()
        original.wait()


@needs_root
def test_page_server_on_a_port_already_in_use(criu: pycriu.Criu, images_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(pycriu.PageServerError) as info:
            with criu.page_server(pycriu.PageServerOptions(images_dir=images_dir, port=port)):
                pytest.fail("the page server must not start")
    assert info.value.operation == "page-server"
    assert info.value.criu_message is not None and "Address already in use" in info.value.criu_message
    assert info.value.log_path == str(images_dir / "page-server.log")


@needs_root
def test_a_binary_that_does_not_speak_criu_rpc_is_a_service_error(tmp_path: Path) -> None:
    criu = pycriu.Criu(binary="/bin/true")
    with pytest.raises(pycriu.ServiceError, match="criu swrk"):
        criu.version()
    with pytest.raises(pycriu.ServiceError):
        criu.check()


# --- Errors as values ---------------------------------------------------------------------------

ALL_ERRORS = [getattr(pycriu, name) for name in pycriu.__all__ if name.endswith("Error")]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_attributes(cls: type[pycriu.CriuError]) -> None:
    err = cls("restore failed: CRIU reported a failure", operation="restore", errno=errno.EEXIST,
              criu_message="Can't fork for 42: File exists (criu/cr-restore.c:1237)",
              log_path="/srv/ckpt/restore.log", hint="try again")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls
    for attr in ("message", "operation", "errno", "criu_message", "log_path", "hint"):
        assert getattr(copy, attr) == getattr(err, attr), attr
    assert str(copy) == str(err)
    assert cls.__module__ == "pycriu"
    assert issubclass(cls, pycriu.CriuError)


@needs_root
def test_a_real_dump_error_survives_pickling(
        criu: pycriu.Criu, images_dir: Path, not_a_session_leader: int) -> None:
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=not_a_session_leader, images_dir=images_dir))
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is pycriu.DumpError
    assert (copy.criu_message, copy.log_path, copy.hint, copy.errno) == (
        info.value.criu_message, info.value.log_path, info.value.hint, info.value.errno)


def test_the_hint_is_derived_from_criu_message_unless_given() -> None:
    err = pycriu.RestoreError("restore failed", criu_message="Can't fork for 7: File exists")
    assert err.hint is not None and "PID namespace" in err.hint
    assert pycriu.RestoreError("x", criu_message="Can't fork for 7", hint="mine").hint == "mine"
    assert pycriu.RestoreError("x", criu_message="something new").hint is None


def test_str_names_the_errno() -> None:
    err = pycriu.DumpError("dump failed", errno=errno.EBADE)
    assert str(err) == "dump failed [errno 52: EBADE]"


def test_builtin_bases_let_callers_catch_broadly() -> None:
    assert issubclass(pycriu.InvalidOptionError, ValueError)
    assert issubclass(pycriu.CriuNotFoundError, FileNotFoundError)
    assert issubclass(pycriu.CriuPermissionError, PermissionError)
    assert issubclass(pycriu.NoSuchProcessError, ProcessLookupError)
    assert issubclass(pycriu.PreDumpError, pycriu.DumpError)


@pytest.fixture(scope="session")
def debian12_criu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian 12's own criu (3.17), unpacked from its package: a real CRIU that is too old."""
    where = tmp_path_factory.mktemp("old-criu")
    download = subprocess.run(["apt-get", "download", "criu=3.17*"], cwd=where, capture_output=True, text=True)
    debs = list(where.glob("criu_3.17*.deb"))
    if download.returncode != 0 or not debs:
        pytest.skip(f"cannot download Debian 12's criu 3.17 package: {download.stderr.strip()[-200:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(where / "root")], check=True)
    return where / "root" / "usr" / "sbin" / "criu"


@needs_root
def test_a_criu_older_than_4_2_is_refused_before_it_is_used(debian12_criu: Path, workload: WorkloadFactory,
                                                            images_dir: Path) -> None:
    old = pycriu.Criu(binary=debian12_criu)
    assert old.version() < (4, 2)
    w = workload(mib=8)
    with pytest.raises(pycriu.CriuVersionError) as info:
        old.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir))
    assert "3.17" in str(info.value) and "provision" in (info.value.hint or "")
    assert w.alive()
    with pytest.raises(pycriu.CriuVersionError):
        old.check()


@needs_root
def test_a_lazy_pages_daemon_that_cannot_start_is_a_lazy_pages_error(criu: pycriu.Criu, images_dir: Path) -> None:
    (images_dir / "pstree.img").write_bytes(b"not a CRIU image")
    with pytest.raises(pycriu.LazyPagesError) as info:
        with criu.lazy_pages(pycriu.LazyPagesOptions(images_dir=images_dir)):
            raise AssertionError("the daemon reported ready on garbage images")
    assert info.value.operation == "lazy-pages"
    assert info.value.criu_message is not None
    assert info.value.log_path is not None and Path(info.value.log_path).exists()
