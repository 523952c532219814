"""Options that CRIU acts on, shown by the effect, not by what was sent: each test has a tree that
CRIU refuses (or treats differently) without the option, and shows the difference with it.
docs/options.rst lists every option with the test that proves it (``test_option_table.py``
keeps that table complete)."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
import pycriu.images
from pycriu import _raw
from pycriu.migration.procs import descendants, kill_tree, tree_state, wait_gone
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]


def _needs_setter(setter: str) -> pytest.MarkDecorator:
    """An option whose libcriu setter this build lacks: pycriu refuses it by name, before CRIU
    runs (tests/test_libcriu_features.py), so its effect cannot be shown here."""
    return pytest.mark.skipif(setter in _raw.MISSING_SETTERS, reason=(
        f"this pycriu is built against libcriu %d.%d, which has no criu_local_{setter} (libcriu "
        f"{_raw.MISSING_SETTERS.get(setter, '')} has it): the option is refused by name" % _raw.COMPILED_VERSION))

CPU_CAP_FPU, CPU_CAP_CPU = 1, 2  # CRIU's cpu_cap bits (criu/include/cr_options.h)


class Program:
    """``python -c CODE`` alone in a PID namespace (the dumpable root of its own session) and the
    namespaces ``unshare`` flags name (``--net``, ``--uts``); CODE touches ``READY`` when its
    state is set up. Without ``session``, CODE runs in this PID namespace as the child of a
    shell that leads its session: the tree's session leader is outside it."""

    def __init__(self, code: str, ready: Path, *, session: bool = True, unshare: Sequence[str] = ()) -> None:
        argv = ["unshare", *unshare, "--pid", "--fork", "setsid", sys.executable, "-c", code] if session else \
            ["setsid", "sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} & wait"]
        self.unshare = subprocess.Popen(argv,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.unshare.poll() is None, "the program exited before it was ready"
            assert time.monotonic() < deadline, "the program did not get ready"
            time.sleep(0.01)
        self.pid = descendants(self.unshare.pid)[1]
        self.pids = [self.pid]

    def close(self) -> None:
        for pid in self.pids:
            kill_tree(pid)
            wait_gone(pid)
        self.unshare.kill()
        self.unshare.wait()


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Callable[..., Program]]:
    made: list[Program] = []

    def start(body: str, *, session: bool = True, unshare: Sequence[str] = ()) -> Program:
        ready = tmp_path / f"ready-{len(made)}"
        code = f"import os, time, pathlib\n{body}\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(3600)\n"
        made.append(Program(code, ready, session=session, unshare=unshare))
        return made[-1]

    yield start
    for p in made:
        p.close()


def _images(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def _dump_refused(criu: pycriu.Criu, pid: int, images: Path, reason: str, **opts: object) -> None:
    """CRIU refuses to dump ``pid`` (asked to leave it running), naming ``reason``."""
    with pytest.raises(pycriu.DumpError) as info:
        criu.dump(pycriu.DumpOptions(pid=pid, images_dir=images, leave_running=True, **opts))  # type: ignore[arg-type]
    assert reason in (info.value.criu_message or ""), info.value.criu_message


def test_ext_unix_sk_dumps_a_connection_to_a_socket_outside_the_tree(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """A datagram socket connected to a server outside the tree (CRIU never dumps half of a
    stream connection, with or without the option)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "srv"))
        p = program("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                    f"s.connect({str(tmp_path / 'srv')!r})")
        _dump_refused(criu, p.pid, _images(tmp_path, "without"), "External socket is used")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                     ext_unix_sk=True))
        assert (tmp_path / "with" / "inventory.img").exists()


def test_file_locks_dumps_and_restores_a_held_lock(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    lockfile = tmp_path / "lockfile"
    p = program(f"import fcntl\nf = open({str(lockfile)!r}, 'w')\nfcntl.flock(f, fcntl.LOCK_EX)")
    _dump_refused(criu, p.pid, _images(tmp_path, "without"), "file locks are hold")
    images = _images(tmp_path, "with")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, file_locks=True))
    wait_gone(p.pid)
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images, file_locks=True))
    p.pids.append(restored.pid)
    inode = os.stat(lockfile).st_ino
    holders = [line.split()[4] for line in Path("/proc/locks").read_text().splitlines()
               if line.split()[5].endswith(f":{inode}")]
    assert holders, "the restored tree does not hold the lock"


def test_ghost_limit_lets_a_larger_deleted_file_into_the_images(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    ghost = tmp_path / "ghost"
    p = program(f"f = open({str(ghost)!r}, 'wb')\nf.write(b'x' * (2 << 20))\nf.flush()\nos.unlink({str(ghost)!r})")
    _dump_refused(criu, p.pid, _images(tmp_path, "without"), "increase limit")  # CRIU's default limit is 1 MiB
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                 ghost_limit=4 << 20))
    assert sum(f.stat().st_size for f in (tmp_path / "with").glob("*.img")) > 2 << 20  # the file's data is in


def test_leave_running_and_leave_stopped_decide_what_the_dump_leaves(
        criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    w = workload(mib=4)
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "running"), leave_running=True))
    assert tree_state(w.pid) == "running"
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "stopped"), leave_stopped=True))
    assert tree_state(w.pid) == "stopped"
    os.kill(w.pid, 18)  # SIGCONT
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "default")))
    assert wait_gone(w.pid), "without either, CRIU ends the dumped tree"


def test_work_dir_log_file_and_log_level_shape_criu_s_log(
        criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    w = workload(mib=4)
    work = _images(tmp_path, "work")
    for level, name in ((pycriu.LogLevel.ERROR, "quiet.log"), (pycriu.LogLevel.DEBUG, "chatty.log")):
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, name), work_dir=work, log_file=name,
                                     log_level=level, leave_running=True))
        assert not (tmp_path / name / name).exists(), "the log went to images_dir, not work_dir"
    quiet, chatty = (work / "quiet.log").read_text(), (work / "chatty.log").read_text()
    assert "Dumping" not in quiet and "Dumping" in chatty
    assert len(chatty) > 20 * max(len(quiet), 1)


def _restore(criu: pycriu.Criu, p: Program, images: Path, **kw: object) -> pycriu.RestoreResult:
    """Restore ``images``; the restored tree is killed with ``p``'s."""
    restored = criu.restore(pycriu.RestoreOptions(images_dir=images, **kw))  # type: ignore[arg-type]
    p.pids.append(restored.pid)
    return restored


def _fd_inodes(pid: int) -> set[int]:
    return {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")}


def test_shell_job_dumps_and_restores_a_tree_whose_session_leader_is_outside_it(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    p = program("", session=False)
    _dump_refused(criu, p.pid, _images(tmp_path, "without"), "is not a session leader")
    images = _images(tmp_path, "with")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, shell_job=True))
    wait_gone(p.pid)
    restored = _restore(criu, p, images, shell_job=True)
    assert tree_state(restored.pid) == "running"
    assert os.getsid(restored.pid) != restored.pid, "a shell job is restored into the restorer's session"


def test_external_and_unix_sk_inodes_name_the_socket_to_the_outside_that_may_be_dumped(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """A socket connected to one outside the tree, named by its inode: ``external=["unix[INODE]"]``
    lets that socket alone be dumped; ``unix_sk_inodes`` makes it CRIU's exception too, but
    libcriu's ``criu_local_add_unix_sk`` also turns ext_unix_sk on, so every such socket dumps."""
    exception = "found exception for unix name-less external socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "srv"))
        p = program("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                    f"s.connect({str(tmp_path / 'srv')!r})\n"
                    f"pathlib.Path({str(tmp_path / 'ino')!r}).write_text(str(os.fstat(s.fileno()).st_ino))")
        inode = int((tmp_path / "ino").read_text())

        def dump(name: str, **given: object) -> str:
            criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, name), leave_running=True,
                                         log_level=pycriu.LogLevel.DEBUG, **given))  # type: ignore[arg-type]
            return (tmp_path / name / "dump.log").read_text()

        for name, given in (("without", {}), ("other", {"external": [f"unix[{inode + 1000000}]"]})):
            with pytest.raises(pycriu.DumpError) as info:
                dump(name, **given)
            assert "External socket is used" in (info.value.criu_message or "")
        assert exception in dump("external", external=[f"unix[{inode}]"])
        assert exception in dump("unix_sk_inodes", unix_sk_inodes=[inode])
        assert exception not in dump("unix_sk_inodes-other", unix_sk_inodes=[inode + 1000000])


def test_pidfd_store_sk_is_the_socket_criu_keeps_its_pidfds_in_and_tells_pid_reuse_by(
        criu: pycriu.Criu, workload: Callable[..., Workload], tmp_path: Path) -> None:
    """CRIU takes the socket from this process by its number and makes it its pidfd store: it
    binds the socket to a name of its own. A dump on top of a parent then tells a reused PID by
    the pidfds in the store, which only a pre-dump leaves there (the pre-dump half is in
    test_option_effects_predump.py): given this store, which the dump left empty, CRIU refuses
    the dump for having none; without a store it reads the parent's inventory instead."""
    w = workload(mib=4)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as store:
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_images(tmp_path, "parent"), leave_running=True,
                                     pidfd_store_sk=store.fileno()))
        name = store.getsockname()
        assert isinstance(name, bytes) and name.startswith(
            f"\0/criu-pidfd-store-{os.getpid()}-{store.fileno()}-".encode()), name
        _dump_refused(criu, w.pid, _images(tmp_path, "store"), "No pidfds found in pidfd store",
                      parent_images="../parent", pidfd_store_sk=store.fileno())
    # a dump's inventory records no start times to compare with
    _dump_refused(criu, w.pid, _images(tmp_path, "no-store"), "Pid-reuse detection failed: no parent inventory",
                  parent_images="../parent")


def test_link_remap_dumps_a_file_open_by_a_name_it_no_longer_has(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """The file the tree opened as ``a`` is now only ``b``: CRIU needs to link it back to dump it."""
    a, b = tmp_path / "a", tmp_path / "b"
    p = program(f"f = open({str(a)!r}, 'w')\nf.write('kept')\nf.flush()\nos.link({str(a)!r}, {str(b)!r})\n"
                f"os.unlink({str(a)!r})")
    _dump_refused(criu, p.pid, _images(tmp_path, "without"), "Use link-remap option")
    images = _images(tmp_path, "with")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, link_remap=True))
    wait_gone(p.pid)
    restored = _restore(criu, p, images)
    assert os.stat(b).st_ino in _fd_inodes(restored.pid), "the restored tree does not hold the file again"


@_needs_setter("set_skip_file_rwx_check")
def test_skip_file_rwx_check_restores_a_file_whose_mode_changed(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    held = tmp_path / "held"
    held.write_text("x")
    held.chmod(0o644)
    p = program(f"f = open({str(held)!r})")
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    held.chmod(0o600)
    with pytest.raises(pycriu.RestoreError) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images))
    assert "has bad mode 0100600 (expect 0100644)" in (info.value.criu_message or "")
    restored = _restore(criu, p, images, skip_file_rwx_check=True)
    assert held.stat().st_ino in _fd_inodes(restored.pid)


def test_evasive_devices_dumps_a_device_whose_path_now_shows_another_node(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """The tree opened a device node, then a tmpfs with a node of the same device was mounted
    over its directory: the path CRIU would restore from names another inode."""
    dev = tmp_path / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    p = program(f"f = open({str(dev / 'null')!r}, 'w')")
    subprocess.run(["mount", "-t", "tmpfs", "pycriu-test", str(dev)], check=True)
    try:
        os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        _dump_refused(criu, p.pid, _images(tmp_path, "without"), "Unaccessible path opened")
        images = _images(tmp_path, "with")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, evasive_devices=True))
        wait_gone(p.pid)
        restored = _restore(criu, p, images)
        assert (dev / "null").stat().st_ino in _fd_inodes(restored.pid), "the restored tree does not hold the node"
    finally:
        for pid in p.pids:
            kill_tree(pid)
            wait_gone(pid)
        subprocess.run(["umount", str(dev)], check=True)


def _watch_paths(images: Path) -> list[str | None]:
    """The path CRIU wrote for each inotify watch (None: the file handle alone)."""
    files = pycriu.images.loads((images / "files.img").read_bytes())["entries"]
    return [wd["f_handle"].get("path") for e in files if e["type"] == "INOTIFY" for wd in e["ify"]["wd"]]


def test_force_irmap_and_irmap_paths_name_a_watched_file_by_a_path_found_by_scanning(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """An inotify watch on ``over/f``, a second name of ``other/g``; then a tmpfs is mounted on
    ``over``: the handle opens, but by a name no longer reachable. CRIU keeps only the handle
    unless forced to map it back to a path, which it finds only where it is told to scan."""
    over, other = tmp_path / "over", tmp_path / "other"
    over.mkdir()
    other.mkdir()
    (other / "g").write_text("x")
    os.link(other / "g", over / "f")  # the newer name is the one the kernel gives the handle
    p = program(f"import ctypes\nfd = ctypes.CDLL(None).inotify_init()\n"
                f"assert ctypes.CDLL(None).inotify_add_watch(fd, {str(over / 'f')!r}.encode(), 2) >= 0")
    subprocess.run(["mount", "-t", "tmpfs", "pycriu-test", str(over)], check=True)
    try:
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "without"), leave_running=True))
        assert _watch_paths(tmp_path / "without") == [None]
        # not in the places CRIU scans by default
        _dump_refused(criu, p.pid, _images(tmp_path, "forced"), "Can't dump that handle", force_irmap=True)
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "scanned"), leave_running=True,
                                     force_irmap=True, irmap_paths=[other]))
        assert _watch_paths(tmp_path / "scanned") == [str(other / "g")]
    finally:
        subprocess.run(["umount", str(over)], check=True)


def test_exec_cmd_runs_after_the_restore_with_its_output_in_the_log(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """CRIU execs the command in its own process once the tree is restored (output to its log)."""
    p = program("")
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    marker = "exec-cmd-ran-after-the-restore"
    _restore(criu, p, images, log_file="plain.log")
    log = images / "exec.log"
    for pid in p.pids[1:]:
        kill_tree(pid)
        wait_gone(pid)
    _restore(criu, p, images, log_file="exec.log", exec_cmd=["echo", marker])
    deadline = time.monotonic() + 10
    while marker not in log.read_text():
        assert time.monotonic() < deadline, "the command's output never reached the log"
        time.sleep(0.02)
    assert marker not in (images / "plain.log").read_text()


def test_orphan_pts_master_dumps_a_pty_whose_master_is_outside_the_tree(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        p = program(f"fd = os.open({os.ttyname(slave)!r}, os.O_RDWR | os.O_NOCTTY)")
        os.close(slave)
        slave = -1
        _dump_refused(criu, p.pid, _images(tmp_path, "without"), "without correspond master peer")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                     orphan_pts_master=True, log_level=pycriu.LogLevel.DEBUG))
        assert "Unpaired slave" in (tmp_path / "with" / "dump.log").read_text()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the test edits x86's cpuinfo image")
def test_cpu_cap_writes_the_cpu_s_features_into_the_images_and_restore_checks_as_asked(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """The images of a dump with cpu_cap hold this CPU's features; a restore with CPU_CAP_CPU
    refuses images that claim features this CPU lacks, one with none of the checks restores."""
    p = program("")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "default"), leave_running=True))
    assert not (tmp_path / "default" / "cpuinfo.img").exists()
    images = _images(tmp_path, "with")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, cpu_cap=CPU_CAP_FPU))
    wait_gone(p.pid)
    cpuinfo = pycriu.images.loads((images / "cpuinfo.img").read_bytes())
    entry = cpuinfo["entries"][0]["x86_entry"][0]
    entry["capability"] = [0xFFFFFFFF] * len(entry["capability"])  # a CPU with every feature
    (images / "cpuinfo.img").write_bytes(pycriu.images.dumps(cpuinfo))
    with pytest.raises(pycriu.RestoreError) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images, cpu_cap=CPU_CAP_CPU))
    assert "CPU capabilities do not match run time" in (info.value.criu_message or "")
    restored = _restore(criu, p, images, cpu_cap=0)
    assert tree_state(restored.pid) == "running"


TCP_PAIR = ("import socket\nsrv = socket.socket()\nsrv.bind(('127.0.0.1', 0))\nsrv.listen()\n"
            "cli = socket.create_connection(srv.getsockname())\nacc, _ = srv.accept()\n")


def _tcp_program(program: Callable[..., Program], tmp_path: Path) -> tuple[Program, int]:
    """A tree holding both ends of a loopback connection; and the port it listens on."""
    p = program(TCP_PAIR + f"pathlib.Path({str(tmp_path / 'port')!r}).write_text(str(srv.getsockname()[1]))")
    return p, int((tmp_path / "port").read_text())


def _established(port: int) -> int:
    """How many ends of connections to or from ``port`` are established."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_tcp_close_restores_an_established_connection_closed(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    p, port = _tcp_program(program, tmp_path)
    assert _established(port) == 2
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "first"), tcp_established=True,
                                 leave_running=True))
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "second"), tcp_established=True))
    wait_gone(p.pid)
    restored = _restore(criu, p, tmp_path / "second", tcp_established=True, tcp_close=True)
    assert _established(port) == 0
    kill_tree(restored.pid)
    wait_gone(restored.pid)
    _restore(criu, p, tmp_path / "first", tcp_established=True)
    assert _established(port) == 2, "without tcp_close the connection comes back established"


def _locked_by(port: int) -> set[str]:
    """Which of iptables and nftables hold CRIU's lock on connections of ``port``."""
    iptables = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    found = set()
    if any(f"port {port} " in f"{line} " and "0xc114" in line for line in iptables.splitlines()):
        found.add("iptables")
    if "CRIU-" in nft and str(port) in nft:
        found.add("nftables")
    return found


@pytest.mark.parametrize("method", [pycriu.NetworkLockMethod.IPTABLES, pycriu.NetworkLockMethod.NFTABLES],
                         ids=["iptables", "nftables"])
def test_network_lock_picks_what_holds_the_dumped_connections_until_the_restore(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path,
        method: pycriu.NetworkLockMethod) -> None:
    p, port = _tcp_program(program, tmp_path)
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images, tcp_established=True, network_lock=method))
    wait_gone(p.pid)
    try:
        assert _locked_by(port) == {method.name.lower()}
    finally:
        _restore(criu, p, images, tcp_established=True, network_lock=method)
    assert _locked_by(port) == set(), "the restore unlocks the connections"
    assert _established(port) == 2


def test_tcp_skip_in_flight_dumps_a_listener_with_a_connection_not_yet_accepted(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    p = program("import socket\nsrv = socket.socket()\nsrv.bind(('127.0.0.1', 0))\nsrv.listen()\n"
                f"pathlib.Path({str(tmp_path / 'port')!r}).write_text(str(srv.getsockname()[1]))")
    with socket.create_connection(("127.0.0.1", int((tmp_path / "port").read_text()))):  # never accepted
        _dump_refused(criu, p.pid, _images(tmp_path, "without"), "In-flight connection (l)")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=_images(tmp_path, "with"), leave_running=True,
                                     tcp_skip_in_flight=True, log_level=pycriu.LogLevel.INFO))
        assert "Skipping in-flight connection (l)" in (tmp_path / "with" / "dump.log").read_text()


def _in_ns(pid: int, flag: str, *argv: str) -> str:
    """``argv``'s output, run in ``pid``'s namespace of the kind ``nsenter`` ``flag`` names."""
    return subprocess.run(["nsenter", "-t", str(pid), flag, *argv], capture_output=True, text=True,
                          check=True).stdout


def test_join_ns_restores_the_tree_into_a_namespace_that_exists(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    holder = subprocess.Popen(["unshare", "--uts", "sleep", "3600"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/uts") == os.readlink("/proc/self/ns/uts"):
            assert time.monotonic() < deadline, "the holder did not get a UTS namespace of its own"
            time.sleep(0.01)
        theirs = os.readlink(f"/proc/{holder.pid}/ns/uts")
        p = program("import socket\nsocket.sethostname('dumped')", unshare=["--uts"])
        images = _images(tmp_path, "images")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
        wait_gone(p.pid)
        restored = _restore(criu, p, images)
        assert os.readlink(f"/proc/{restored.pid}/ns/uts") not in (theirs, os.readlink("/proc/self/ns/uts"))
        assert _in_ns(restored.pid, "-u", "hostname").strip() == "dumped"
        kill_tree(restored.pid)
        wait_gone(restored.pid)
        restored = _restore(criu, p, images, join_ns=[pycriu.JoinNamespace("uts", f"/proc/{holder.pid}/ns/uts")])
        assert os.readlink(f"/proc/{restored.pid}/ns/uts") == theirs
    finally:
        holder.kill()
        holder.wait()


@_needs_setter("set_empty_ns")
def test_empty_ns_restores_the_network_namespace_without_its_contents(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    p = program("import subprocess\nsubprocess.run(['ip', 'addr', 'add', '10.1.2.3/32', 'dev', 'lo'], check=True)",
                unshare=["--net"])
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    restored = _restore(criu, p, images)
    assert "10.1.2.3/32" in _in_ns(restored.pid, "-n", "ip", "-o", "addr")
    kill_tree(restored.pid)
    wait_gone(restored.pid)
    restored = _restore(criu, p, images, empty_ns=pycriu.Namespace.NET)
    assert os.readlink(f"/proc/{restored.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert "10.1.2.3" not in _in_ns(restored.pid, "-n", "ip", "-o", "addr")


def test_weak_sysctls_restores_a_tree_whose_images_set_sysctls_this_kernel_lacks(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """The tree's network namespace has a bridge of MTU 1000, which the kernel gives no IPv6: none
    of its ``net/ipv6/conf/pyc0/*`` sysctls exist. The images are edited to hold values for them,
    as a dump made where the bridge had IPv6 would: CRIU refuses to restore sysctls it cannot
    write unless weak_sysctls lets it skip those the restoring kernel lacks."""
    p = program("import subprocess\nsubprocess.run(['ip', 'link', 'add', 'name', 'pyc0', 'mtu', '1000', 'type', "
                "'bridge'], check=True)", unshare=["--net"])
    images = _images(tmp_path, "images")
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    [netdev_img] = images.glob("netdev-*.img")
    [netns_img] = images.glob("netns-*.img")
    netdev = pycriu.images.loads(netdev_img.read_bytes())
    bridge = next(e for e in netdev["entries"] if e["name"] == "pyc0")
    assert not any("iarg" in c for c in bridge["conf6"]), "the bridge had IPv6 sysctls when it was dumped"
    bridge["conf6"] = pycriu.images.loads(netns_img.read_bytes())["entries"][0]["def_conf6"]  # a new device's
    netdev_img.write_bytes(pycriu.images.dumps(netdev))
    with pytest.raises(pycriu.RestoreError) as info:
        criu.restore(pycriu.RestoreOptions(images_dir=images))
    assert "Can't open sysctl net/ipv6/conf/pyc0/" in (info.value.criu_message or ""), info.value.criu_message
    restored = _restore(criu, p, images, weak_sysctls=True, log_level=pycriu.LogLevel.INFO)
    assert " pyc0: " in _in_ns(restored.pid, "-n", "ip", "-o", "link")
    assert "Will skip non-existent sysctls on restore" in (images / "restore.log").read_text()


def test_veth_pairs_names_the_outside_end_of_a_restored_veth(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:
    """The tree's network namespace holds one end of a veth pair whose other end was on the host:
    restored, the inside end has a peer on the host only when veth_pairs names it (without it,
    CRIU makes the pair inside where the kernel lets it, or fails)."""
    tag = uuid.uuid4().hex[:6]
    inside, outside, restored_outside = f"pyc{tag}i", f"pyc{tag}o", f"pyc{tag}r"

    def host_links() -> str:
        return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout

    p = program("", unshare=["--net"])
    try:
        subprocess.run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside], check=True)
        subprocess.run(["ip", "link", "set", inside, "netns", str(p.pid)], check=True)
        images = _images(tmp_path, "images")
        criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
        wait_gone(p.pid)
        try:
            restored = _restore(criu, p, images)
        except pycriu.RestoreError as exc:
            # CRIU cannot place the peer: its namespace was outside the tree ("veth is in an
            # external netns" in the dump). It logs that and goes on to create the pair inside;
            # Debian's 6.1 refuses that creation (EBUSY), 6.18 accepts it.
            assert exc.criu_message is not None and "Unknown peer net namespace" in exc.criu_message, exc
            assert "Can't restore link" in (images / "restore.log").read_text(), "failed elsewhere than the link"
        else:
            assert f" {inside}@" in _in_ns(restored.pid, "-n", "ip", "-o", "link")
            kill_tree(restored.pid)
            wait_gone(restored.pid)
        assert f"pyc{tag}" not in host_links()
        restored = _restore(criu, p, images, veth_pairs=[pycriu.VethPair(inside, restored_outside)])
        assert f" {restored_outside}@" in host_links()
    finally:
        for name in (outside, restored_outside):
            if f" {name}@" in host_links():
                subprocess.run(["ip", "link", "del", name], check=True)
