"""The agent validates everything it receives: image names (no traversal, no absolute paths, no
links), sizes, message types, fields and their order. Each test speaks the protocol directly to a
real agent process and checks that it refuses, ends the session, and wrote nothing outside it."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root

import pycriu
from pycriu.migration import AgentError, TransportError, checks
from pycriu.migration.guard import Guard
from pycriu.migration.protocol import KIND_CONTROL, KIND_DATA, PROTOCOL_VERSION, Channel
from pycriu.migration.transport import Connection, Destination, connect

pytestmark = [needs_root]


def _hello() -> dict[str, Any]:
    version = pycriu.Criu().version()
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "pycriu": pycriu.__version__, "criu": str(version),
            "arch": platform.machine(), "kernel": platform.release(), "mode": "classic",
            "features": {"lazy_pages": True, "mem_track": False}}


def _raw(channel: Channel, obj: Any, kind: int = KIND_CONTROL) -> None:
    """Send a frame without the sender's own schema check (what a hostile client would do)."""
    payload = obj if isinstance(obj, bytes) else __import__("json").dumps(obj).encode()
    channel._send_frame(kind, payload)  # noqa: SLF001


@contextmanager
def _agent_session(*agent_args: str) -> Iterator[Connection]:
    """A local agent process (started with ``agent_args``) with a session opened by ``hello``."""
    command = (sys.executable, "-m", "pycriu.migration.agent", "--stdio", *agent_args) if agent_args else None
    conn = connect(Destination("local"), timeout=30, agent_command=command)
    try:
        conn.channel.send(_hello())
        reply = conn.channel.recv("hello")
        assert reply["criu_check"] is True
        yield conn
    finally:
        conn.close(timeout=10)


@pytest.fixture
def agent(private_tmp: Path) -> Iterator[Connection]:
    """A local agent process with a session opened by ``hello``."""
    with _agent_session() as conn:
        yield conn


def _refused(conn: Connection, match: str | None = None) -> str:
    """The agent answers with an error and ends the session."""
    with pytest.raises(AgentError, match=match) as info:
        conn.channel.recv("files-ok", "pong", "dir-ready", "restored", "committed")
    with pytest.raises(TransportError):  # the session is over
        conn.channel.recv()
    return info.value.message


def _session(conn: Connection) -> Path:
    assert conn.root is not None
    (session,) = conn.root.glob("s-*")
    return session


def _outside_untouched(conn: Connection) -> None:
    """Nothing outside the session directory, no symlink anywhere. The agent removes the session
    directory as the session ends, possibly while this walks it: os.walk skips what vanished."""
    assert conn.root is not None
    for top, dirs, files in os.walk(conn.root):
        for name in dirs + files:
            p = Path(top, name)
            assert p.relative_to(conn.root).parts[0].startswith("s-"), f"agent wrote {p} outside its session"
            assert not p.is_symlink(), f"agent created or kept a symlink {p}"


HOSTILE_NAMES = ["../x.img", "/etc/passwd", "a/b.img", "..", ".", "", "x\x00y.img", "pages-1.img/../../x.img",
                 "PAGES-1.IMG", ".hidden.img", "a" * 200 + ".img", "parent", "inventory.img.", "inventory.img\n",
                 "core-1.img/", "..img", "pages-1..img", "../../../../tmp/evil.img", "\\x.img", "~root.img"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_image_names_are_refused(agent: Connection, name: str, private_tmp: Path) -> None:
    _raw(agent.channel, {"type": "file", "dir": "images", "name": name, "size": 3})
    message = _refused(agent)
    assert "refused" in message or "invalid" in message or "name" in message
    _outside_untouched(agent)
    assert not (private_tmp / "x.img").exists() and not Path("/tmp/evil.img").exists()


@pytest.mark.parametrize("directory", ["../images", "/", "images/..", "pre-0", "work", "logs", "", "pre-1/x"])
def test_hostile_directory_names_are_refused(agent: Connection, directory: str) -> None:
    _raw(agent.channel, {"type": "file", "dir": directory, "name": "core-1.img", "size": 1})
    _refused(agent, "directory")
    _outside_untouched(agent)


def test_a_symlink_planted_in_the_session_is_never_followed(agent: Connection, private_tmp: Path) -> None:
    target = private_tmp / "target"
    link = _session(agent) / "images" / "core-1.img"
    link.symlink_to(target)
    _raw(agent.channel, {"type": "file", "dir": "images", "name": "core-1.img", "size": 5})
    _refused(agent, "already exists")
    assert not target.exists()


def test_a_file_sent_twice_is_refused(agent: Connection) -> None:
    agent.channel.send({"type": "file", "dir": "images", "name": "core-1.img", "size": 2})
    agent.channel.send_data(b"ab")
    agent.channel.send({"type": "file", "dir": "images", "name": "core-1.img", "size": 2})
    _refused(agent, "already sent")


def test_sizes_are_limited(private_tmp: Path) -> None:
    with _agent_session("--max-file-size", "1000") as conn:
        conn.channel.send({"type": "file", "dir": "images", "name": "pages-1.img", "size": 1001})
        _refused(conn, "exceeds the limit")


def test_the_file_limit_holds_across_batches(private_tmp: Path) -> None:
    """The session's file allowance shrinks with every batch: a peer cannot reset it by ending a
    batch (files-done) and starting another."""
    with _agent_session("--max-files", "3") as conn:
        for batch in range(2):
            count = 2 if batch == 0 else 1
            for i in range(count):
                conn.channel.send({"type": "file", "dir": "images", "name": f"core-{batch}{i}.img", "size": 0})
            conn.channel.send({"type": "files-done", "dir": "images", "count": count, "bytes": 0})
            conn.channel.recv("files-ok")
        conn.channel.send({"type": "file", "dir": "images", "name": "core-99.img", "size": 0})
        _refused(conn, "limit of")


def test_more_data_than_announced_is_refused(agent: Connection) -> None:
    agent.channel.send({"type": "file", "dir": "images", "name": "core-1.img", "size": 4})
    agent.channel.send_data(b"12345")
    _refused(agent, "more data than announced")
    # the partial file is removed; the refused session (CRIU never ran) may be gone already
    assert agent.root is not None and not list(agent.root.glob("s-*/images/core-1.img"))


def test_sparse_ranges_must_lie_inside_the_file(agent: Connection) -> None:
    _raw(agent.channel, {"type": "file", "dir": "images", "name": "pages-1.img", "size": 8192,
                         "ranges": [[4096, 8192]]})
    _refused(agent, "ranges")


def test_an_oversized_frame_is_refused(agent: Connection) -> None:
    agent.channel.stream.write(bytes([KIND_CONTROL]) + (64 << 20).to_bytes(4, "big"))
    _refused(agent, "exceeds the limit")


@pytest.mark.parametrize("payload", [
    b"not json", b"[1, 2]", b'{"type": "file", "type": "bye"}', b'{"type": "ping", "t": NaN}',
    b'{"type": "launch-missiles"}', b'{"type": "ping"}', b'{"type": "ping", "t": "now"}',
    b'{"type": "ping", "t": 1, "extra": true}', b'{"type": "restored", "pid": 1}', b"\xff\xfe",
])
def test_malformed_or_unknown_messages_are_refused(agent: Connection, payload: bytes) -> None:
    _raw(agent.channel, payload)
    _refused(agent)


def test_data_without_a_file_is_refused(agent: Connection) -> None:
    _raw(agent.channel, b"stray", KIND_DATA)
    _refused(agent, "data")


@pytest.mark.parametrize("msg", [
    {"type": "commit"},
    {"type": "lazy-wait", "timeout": 1},
    {"type": "restore", "dir": "images", "lazy": False, "page_server": None, "flags": {}},
])
def test_requests_out_of_order_are_refused(agent: Connection, msg: dict[str, Any]) -> None:
    agent.channel.send(msg)
    _refused(agent)


@pytest.mark.parametrize("directory", ["pre-1", "images"])
def test_pagemaps_only_of_a_pre_dump_page_server(agent: Connection, directory: str) -> None:
    """hybrid's source asks for the pagemaps of each round; there must have been that round."""
    agent.channel.send({"type": "pagemaps", "dir": directory})
    _refused(agent, "no pre-dump page server")


def test_only_safe_restore_flags_are_accepted(agent: Connection) -> None:
    for name in ("inventory.img", "pstree.img"):
        agent.channel.send({"type": "file", "dir": "images", "name": name, "size": 1})
        agent.channel.send_data(b"x")
    agent.channel.send({"type": "files-done", "dir": "images", "count": 2, "bytes": 2})
    agent.channel.recv("files-ok")
    agent.channel.send({"type": "restore", "dir": "images", "lazy": False, "page_server": None,
                        "flags": {"exec_cmd": True}})
    _refused(agent, "not allowed")


def test_hello_comes_first(private_tmp: Path) -> None:
    conn = connect(Destination("local"), timeout=30)
    try:
        conn.channel.send({"type": "file", "dir": "images", "name": "core-1.img", "size": 1})
        _refused(conn, "not allowed")
        assert conn.root is not None and not list(conn.root.glob("s-*"))
    finally:
        conn.close(timeout=10)


@pytest.mark.parametrize(("change", "says"), [
    ({"criu": "99.0.0"}, r"older than the source.*99\.0\.0|99\.0\.0.*older than the source"),
    ({"arch": "aarch64"}, f"architecture differs: source aarch64, destination {platform.machine()}"),
    ({"protocol": 2}, r"protocol 2 is not supported \(this agent speaks 1\)"),
], ids=["newer CRIU on the source", "another architecture", "another protocol"])
def test_an_incompatible_source_is_refused_at_hello_naming_both_sides(
        private_tmp: Path, change: dict[str, object], says: str) -> None:
    conn = connect(Destination("local"), timeout=30)
    try:
        conn.channel.send({**_hello(), **change})
        _refused(conn, says)
        assert conn.root is not None and not list(conn.root.glob("s-*"))
    finally:
        conn.close(timeout=10)


def test_the_agent_cleans_its_session_after_a_clean_goodbye(private_tmp: Path) -> None:
    conn = connect(Destination("local"), timeout=30)
    try:
        conn.channel.send(_hello())
        conn.channel.recv("hello")
        conn.channel.send({"type": "bye"})
        assert conn.channel.recv("bye")["disk"]["total"] == 0
        assert conn.process is not None
        assert conn.process.wait(10) == 0
        assert conn.root is not None and not list(conn.root.iterdir())
    finally:
        conn.close(timeout=10)
    assert os.path.exists(private_tmp)


def _send_daemon_images(conn: Connection) -> None:
    for name in ("inventory.img", "pstree.img"):
        conn.channel.send({"type": "file", "dir": "images", "name": name, "size": 1})
        conn.channel.send_data(b"x")


def test_lazy_pages_before_the_images_it_reads_is_refused(agent: Connection) -> None:
    # no reply when accepted; the refusal is the agent's next message (a ping sent after it could
    # meet a closed pipe)
    agent.channel.send({"type": "lazy-pages", "dir": "images", "page_server": {"address": "127.0.0.1", "port": 1}})
    _refused(agent, "before inventory.img and pstree.img")


@pytest.mark.parametrize("message", ["lazy-pages", "restore"])
def test_the_source_page_server_must_be_on_the_source(agent: Connection, message: str) -> None:
    """A peer cannot make the agent's root lazy-pages daemon connect anywhere: the page server to
    read from must be at the source's own address (this peer is on loopback)."""
    _send_daemon_images(agent)
    elsewhere = {"address": "192.0.2.1", "port": 27}  # TEST-NET-1: refused before any connection
    if message == "lazy-pages":  # no reply when accepted; the refusal is the agent's next message
        agent.channel.send({"type": "lazy-pages", "dir": "images", "page_server": elsewhere})
    else:
        agent.channel.send({"type": "files-done", "dir": "images", "count": 2, "bytes": 2})
        agent.channel.recv("files-ok")
        agent.channel.send({"type": "restore", "dir": "images", "lazy": True, "page_server": elsewhere, "flags": {}})
    _refused(agent, "is not the source")


def test_an_early_lazy_pages_daemon_that_fails_is_reported_by_the_restore(agent: Connection) -> None:
    _send_daemon_images(agent)  # not real images: criu lazy-pages fails on them
    ps = {"address": "127.0.0.1", "port": 1}
    agent.channel.send({"type": "lazy-pages", "dir": "images", "page_server": ps})
    agent.channel.send({"type": "files-done", "dir": "images", "count": 2, "bytes": 2})
    agent.channel.recv("files-ok")
    agent.channel.send({"type": "restore", "dir": "images", "lazy": True, "page_server": ps, "flags": {}})
    _refused(agent, "lazy-pages daemon failed to start")


def test_a_restore_cannot_swap_the_early_lazy_pages_daemon(agent: Connection) -> None:
    _send_daemon_images(agent)
    agent.channel.send({"type": "lazy-pages", "dir": "images", "page_server": {"address": "127.0.0.1", "port": 1}})
    agent.channel.send({"type": "files-done", "dir": "images", "count": 2, "bytes": 2})
    agent.channel.recv("files-ok")
    agent.channel.send({"type": "restore", "dir": "images", "lazy": True, "flags": {},
                        "page_server": {"address": "127.0.0.1", "port": 2}})
    _refused(agent, "another lazy-pages daemon")


def test_a_successful_check_is_cached_for_the_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "CACHE_FILE", tmp_path / "run" / "criu-check.json")
    monkeypatch.setattr(checks, "_MEMO", {})
    first = checks.probe(pycriu.Criu())
    assert not first.cached
    assert checks.CACHE_FILE.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr(checks, "_MEMO", {})  # as a new process would: from the file
    second = checks.probe(pycriu.Criu())
    assert second.cached and (second.lazy_pages, second.mem_track) == (first.lazy_pages, first.mem_track)
    assert second.criu == first.criu  # the version is asked every time
    data = checks.CACHE_FILE.read_text().replace(first.criu, "0.0.1")  # another CRIU: not reused
    checks.CACHE_FILE.write_text(data)
    monkeypatch.setattr(checks, "_MEMO", {})
    assert not checks.probe(pycriu.Criu()).cached


def test_the_guard_spares_a_committed_tree_and_kills_a_held_one(tmp_path: Path) -> None:
    """The guard (:mod:`pycriu.migration.guard`) kills the tree it holds when its pipe closes
    without a ``release`` (the agent died, or its session ended with a tree it did not know of);
    a released (committed) tree outlives it. Holding a pid that is already gone is harmless."""
    kept = subprocess.Popen(["sleep", "60"])
    doomed = subprocess.Popen(["sleep", "60"])
    try:
        guard = Guard(tmp_path / "kept.log")
        guard.hold(kept.pid)
        guard.release()
        guard.close()
        assert kept.poll() is None
        assert not (tmp_path / "kept.log").exists()

        guard = Guard(tmp_path / "doomed.log")
        guard.hold(doomed.pid)
        guard.close()  # the pipe closes (the agent died, or its session ended) without a release
        assert doomed.wait(10) == -signal.SIGKILL
        assert f"killed its restored tree {doomed.pid}" in (tmp_path / "doomed.log").read_text()

        gone = subprocess.Popen(["true"])
        gone.wait()
        guard = Guard(tmp_path / "gone.log")
        guard.hold(gone.pid)  # reaped already
        guard.hold(kept.pid)
        guard.release()
        guard.close()
        assert kept.poll() is None  # the guard survived the bad hold and obeyed the rest
    finally:
        for proc in (kept, doomed):
            proc.kill()
            proc.wait()


def test_the_agent_starts_without_the_source_side() -> None:
    """A local migration waits for its agent's start-up (Python, then imports) before it may
    freeze anything: the agent imports none of the source's side (Migration, its flows, client,
    report), while ``pycriu.Migration`` still resolves on first use."""
    code = ("import sys, pycriu.migration.agent; "
            "print(sorted(m for m in sys.modules if m.startswith('pycriu.migration.') and m.rsplit('.', 1)[1] "
            "in ('migration', 'flows', 'client', 'report', 'policy'))); "
            "import pycriu; print(pycriu.Migration.__module__, 'Migration' in dir(pycriu))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "pycriu.migration.migration True"]
    code = "import pycriu; print(pycriu.migration.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == \
        "pycriu.migration\n"


def test_a_local_agent_takes_whole_images_by_hard_link(agent: Connection, private_tmp: Path) -> None:
    """The local transport's agent shares the source's host: an image may come as a name to link
    (``file-link``), so that nothing is copied; the agent counts it like a received file."""
    src = private_tmp / "core-1.img"
    src.write_bytes(b"abc")
    agent.channel.send({"type": "file-link", "dir": "images", "name": "core-1.img", "size": 3, "path": str(src)})
    agent.channel.send({"type": "files-done", "dir": "images", "count": 1, "bytes": 3})
    reply = agent.channel.recv("files-ok")
    assert (reply["count"], reply["bytes"]) == (1, 3)
    assert os.path.samestat((_session(agent) / "images" / "core-1.img").stat(), src.stat())


def test_an_image_the_kernel_will_not_link_is_copied_instead(agent: Connection) -> None:
    """Across filesystems (here a tmpfs file into the session's directory on disk) ``link()``
    fails with EXDEV: the agent copies the same checked file instead of failing the migration."""
    if os.stat("/dev/shm").st_dev == os.stat(_session(agent)).st_dev:
        pytest.skip("/dev/shm and the agent's directory are one filesystem here: nothing to copy across")
    src = Path(tempfile.mkdtemp(dir="/dev/shm")) / "core-1.img"
    try:
        src.write_bytes(b"abc" * 1000)
        agent.channel.send({"type": "file-link", "dir": "images", "name": "core-1.img", "size": 3000,
                            "path": str(src)})
        agent.channel.send({"type": "files-done", "dir": "images", "count": 1, "bytes": 3000})
        assert agent.channel.recv("files-ok")["bytes"] == 3000
        got = _session(agent) / "images" / "core-1.img"
        assert got.read_bytes() == src.read_bytes() and not os.path.samestat(got.stat(), src.stat())
        agent.channel.send({"type": "bye"})
        assert agent.channel.recv("bye")["disk"]["other_images"] == 3000  # written here: it counts
    finally:
        shutil.rmtree(src.parent)


@pytest.mark.parametrize("case", ["symlink", "relative", "wrong size", "directory", "missing", "hostile name"])
def test_hostile_links_are_refused(agent: Connection, private_tmp: Path, case: str) -> None:
    real = private_tmp / "real.img"
    real.write_bytes(b"abc")
    path, name, size = str(real), "core-1.img", 3
    if case == "symlink":
        (private_tmp / "link.img").symlink_to(real)
        path = str(private_tmp / "link.img")
    elif case == "relative":
        path = os.path.relpath(real)
    elif case == "wrong size":
        size = 4
    elif case == "directory":
        path = str(private_tmp)
    elif case == "missing":
        path = str(private_tmp / "gone.img")
    else:
        name = "../core-1.img"
    _raw(agent.channel, {"type": "file-link", "dir": "images", "name": name, "size": size, "path": path})
    _refused(agent)
    assert real.read_bytes() == b"abc" and real.stat().st_nlink == 1  # no link of it was left anywhere
    _outside_untouched(agent)


def test_an_agent_not_on_the_source_host_refuses_links(private_tmp: Path) -> None:
    """Only an agent told it shares the source's host (``--same-host``, which the local
    transport passes) accepts ``file-link``; and only over ``--stdio``."""
    src = private_tmp / "core-1.img"
    src.write_bytes(b"abc")
    with _agent_session("--images-on-disk") as conn:  # started without --same-host
        conn.channel.send({"type": "file-link", "dir": "images", "name": "core-1.img", "size": 3, "path": str(src)})
        _refused(conn, "only by an agent on the source's host")
    done = subprocess.run([sys.executable, "-m", "pycriu.migration.agent", "--listen", "127.0.0.1:0", "--same-host"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--same-host is for --stdio" in done.stderr
