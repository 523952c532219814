"""The agent survives hostile and broken peers: structured fuzzing of every message type a client
may send (built from the protocol's own schemas: well-formed, with fields dropped, retyped or
added, in any order, after a valid ``hello`` or not), random and truncated frames, oversized
headers, data frames where control was due, random bytes before and inside TLS, and more
connections at once than it authenticates. After all of it the agent still runs, its log holds no
traceback, its fds and memory stayed bounded, no file appeared outside its directory, every reply
it sent was a valid message, and the next honest migration is served at once.

Bounded for CI: ``PYCRIU_FUZZ_EXAMPLES`` (default 120) examples per test; ``make fuzz`` runs more
and writes the counts per message type (``PYCRIU_FUZZ_REPORT``), the numbers in
``docs/migration.rst``.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from migration_support import TcpAgent, assert_moved

from pycriu import Migration, __version__
from pycriu.migration import controltls, protocol
from pycriu.migration.agent_sandbox import KEEP_FAILED, criu_logs
from pycriu.migration.errors import MigrationError
from pycriu.migration.transport import Destination, connect
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

SECRET = b"fuzz-secret-0123456789abcdefghij"
EXAMPLES = int(os.environ.get("PYCRIU_FUZZ_EXAMPLES", "120"))
MARK = "fuzzmark"  # in every path-like string the fuzzer makes: found anywhere afterwards = escaped
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
CLIENT_TYPES = sorted(protocol.FROM_CLIENT - {"auth"})  # "auth" is the handshake's, tested apart
COUNTS: collections.Counter[str] = collections.Counter()


# --- strategies from the schemas ------------------------------------------------------------------

NAMES = st.sampled_from(["images", "pre-1", "pre-0", "pre-99999", f"../{MARK}", f"/tmp/{MARK}", f"{MARK}.img",
                         f"images/../{MARK}.img", f"{MARK}/x.img", "pages-1.img", "pagemap-1.img", "inventory.img",
                         "pstree.img", f".{MARK}.img", f"{MARK}\x00.img", "", "x" * 5000])
TEXT = st.one_of(NAMES, st.text(max_size=24).map(lambda t: MARK + t))
INTS = st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, -1, 1, 1 << 31, 1 << 40, (1 << 63) - 1]))
ANY = st.recursive(st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
                   lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                   max_leaves=8)


def _values(types: Any) -> st.SearchStrategy[Any]:
    """Values of a field's declared type(s), as :func:`pycriu.migration.protocol.validate` reads them."""
    if isinstance(types, dict):
        return _fields(types)
    if isinstance(types, tuple) and len(types) == 2 and isinstance(types[0], dict):
        return _fields(types[0]) | st.none()
    choices: list[st.SearchStrategy[Any]] = []
    for t in types if isinstance(types, tuple) else (types,):
        choices.append({str: TEXT, int: INTS, float: st.floats(-1e6, 1e6), bool: st.booleans(),
                        type(None): st.none(), list: st.lists(ANY, max_size=6),
                        dict: st.dictionaries(TEXT, ANY, max_size=4)}[t])
    return st.one_of(choices)


def _fields(spec: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    required = {name: _values(types) for name, (types, req) in spec.items() if req}
    optional = {name: _values(types) for name, (types, req) in spec.items() if not req}
    return st.fixed_dictionaries(required, optional=optional)


@st.composite
def _message(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    msg = {"type": kind, **draw(_fields(protocol.MESSAGES[kind]))}
    how = draw(st.sampled_from(["as is", "as is", "drop", "retype", "add"]))
    if how == "drop" and len(msg) > 1:
        msg.pop(draw(st.sampled_from(sorted(set(msg) - {"type"}))))
    elif how == "retype" and len(msg) > 1:
        msg[draw(st.sampled_from(sorted(set(msg) - {"type"})))] = draw(ANY)
    elif how == "add":
        msg[draw(TEXT)] = draw(ANY)
    return msg


#: One frame to send: a control message, a raw control payload, or a data frame.
CONTROL = st.sampled_from(CLIENT_TYPES).flatmap(_message).map(lambda m: ("control", m))
FRAME = st.one_of(
    CONTROL, CONTROL, CONTROL, CONTROL,
    st.binary(max_size=300).map(lambda b: ("raw", b)),
    st.sampled_from([b"null", b"[]", b'{"type": 1}', b'{"type": "welcome"}', b'{"type": "hello", "type": "x"}',
                     b"NaN", b'{"type": "ping", "t": 1e999}', b"\xff\xfe"]).map(lambda b: ("raw", b)),
    st.binary(max_size=2000).map(lambda b: ("data", b)),
)


# --- the agent under fuzzing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpAgent]:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "secret").write_bytes(SECRET)
    a = TcpAgent(d / "root", "--secret-file", str(d / "secret"))
    time.sleep(0.5)  # its background checks done
    BASELINE.update(fds=_fd_count(a.proc.pid), rss=_rss_kib(a.proc.pid))
    yield a
    a.close()


def _hello() -> dict[str, Any]:
    out = subprocess.run(["criu", "--version"], capture_output=True, text=True, check=True).stdout
    version = next(line.split()[1] for line in out.splitlines() if line.startswith("Version:"))
    return {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "mode": "classic", "pycriu": __version__,
            "criu": version, "arch": platform.machine(), "kernel": platform.release(),
            "features": {"lazy_pages": True, "mem_track": False}}


HELLO: dict[str, Any] = {}
BASELINE: dict[str, int] = {}


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _drain(channel: protocol.Channel, seconds: float) -> list[dict[str, Any]]:
    """What the agent answered until it hung up or went quiet; each reply must be valid."""
    replies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            kind, payload = channel._recv_frame(max(0.05, deadline - time.monotonic()))
        except (MigrationError, OSError, ValueError):
            break
        if kind == protocol.KIND_CONTROL:
            replies.append(protocol.validate(protocol.decode(payload), sender="agent"))
    return replies


def _send(channel: protocol.Channel, frame: tuple[str, Any]) -> None:
    what, value = frame
    if what == "control":
        COUNTS[value["type"]] += 1
        payload = json.dumps(value).encode()
        if len(payload) <= protocol.MAX_CONTROL:
            channel._send_frame(protocol.KIND_CONTROL, payload)
    else:
        COUNTS[f"({what} frame)"] += 1
        channel._send_frame(protocol.KIND_CONTROL if what == "raw" else protocol.KIND_DATA, value)


def _session(agent: TcpAgent) -> protocol.Channel:
    conn = connect(Destination.parse(agent.url), secret=SECRET, timeout=10)
    return conn.channel


@FUZZ
@given(frames=st.lists(FRAME, min_size=1, max_size=6), hello_first=st.booleans())
def test_structured_fuzzing_of_every_message_type(agent: TcpAgent, frames: list[tuple[str, Any]],
                                                  hello_first: bool) -> None:
    channel = _session(agent)
    try:
        if hello_first:
            HELLO.setdefault("msg", _hello())
            channel.send(HELLO["msg"])
            assert channel.recv("hello", timeout=30)["session"]
        for frame in frames:
            try:
                _send(channel, frame)
            except MigrationError:
                break  # the agent hung up on an earlier frame: a refusal
        for reply in _drain(channel, 0.5):
            if reply["type"] == "error":
                assert reply["code"] and reply["message"], reply
    finally:
        channel.close()
    assert agent.proc.poll() is None, "the agent died"


@FUZZ
@given(data=st.binary(max_size=4096), inside_tls=st.booleans(), cut=st.booleans())
def test_random_bytes_before_and_inside_tls(agent: TcpAgent, data: bytes, inside_tls: bool, cut: bool) -> None:
    COUNTS["(random bytes, " + ("inside TLS)" if inside_tls else "before TLS)")] += 1
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    try:
        if inside_tls:
            sock = controltls.client_context().wrap_socket(sock)
            sock.recv(65536)  # the welcome
        sock.sendall(data[: len(data) // 2] if cut else data)
        if not cut:
            sock.settimeout(0.3)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError, ssl.SSLError):
                pass
    except (OSError, ssl.SSLError):
        pass  # refused: what it should do with garbage
    finally:
        sock.close()
    assert agent.proc.poll() is None, "the agent died"


@pytest.mark.parametrize("header", [b"\x01\xff\xff\xff\xff", b"\x02\x00\x10\x00\x01", b"\x07\x00\x00\x00\x01",
                                    b"\x01\x00\x00\x00\x64" + b"{" * 10])
def test_oversized_unknown_and_truncated_frames_inside_tls(agent: TcpAgent, header: bytes) -> None:
    COUNTS["(bad header)"] += 1
    sock = controltls.client_context().wrap_socket(socket.create_connection(("127.0.0.1", agent.port), timeout=10))
    with sock:
        sock.recv(65536)
        sock.sendall(header)
        sock.settimeout(5)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, OSError, ssl.SSLError):
            pass
    assert agent.proc.poll() is None


def test_more_connections_at_once_than_it_authenticates(agent: TcpAgent) -> None:
    COUNTS["(connection flood)"] += 60
    socks = []
    try:
        for _ in range(60):
            socks.append(socket.create_connection(("127.0.0.1", agent.port), timeout=10))
        time.sleep(0.5)
        t0 = time.monotonic()
        channel = _session(agent)  # beyond the 32 handshakes in flight: refused at once, or served
        channel.close()
        assert time.monotonic() - t0 < 15
    except MigrationError:
        pass
    finally:
        for s in socks:
            s.close()
    assert agent.proc.poll() is None


def test_after_all_of_it_the_agent_is_whole_and_serves_an_honest_migration(
        agent: TcpAgent, workload: Any, tmp_path: Path) -> None:
    """Runs last in this file (pytest keeps the order): the checks on what the fuzzing left."""
    pid = agent.proc.pid
    time.sleep(1.0)  # sessions that were refused finish their cleanup
    assert agent.proc.poll() is None
    log = Path(agent.log.name).read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]
    assert _fd_count(pid) <= BASELINE["fds"] + 4, sorted(os.listdir(f"/proc/{pid}/fd"))
    assert _rss_kib(pid) <= BASELINE["rss"] + (64 << 10), (BASELINE, _rss_kib(pid))
    kept = [p for p in agent.root.iterdir() if p.name.startswith("s-")]
    # a refused session leaves nothing; one where CRIU ran (a page server) keeps its logs, the
    # newest KEEP_FAILED of them only
    assert len(kept) <= KEEP_FAILED, kept
    for d in kept:
        assert [p.name for p in d.iterdir()] == ["work"] and criu_logs(d / "work"), sorted(d.rglob("*"))
    for where in (agent.root.parent, Path("/tmp"), Path("/dev/shm"), Path("/"), Path.cwd()):
        escaped = [p for p in where.iterdir() if MARK in p.name]
        assert not escaped, f"the fuzzer's names escaped the agent's directory: {escaped}"
    w: Workload = workload(mib=8)
    t0 = time.monotonic()
    report = Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, log_dir=tmp_path / "logs").run()
    assert_moved(w, report)
    assert time.monotonic() - t0 < 30
    total = sum(COUNTS.values())
    report_path = os.environ.get("PYCRIU_FUZZ_REPORT")
    if report_path:
        Path(report_path).write_text(json.dumps({"total": total, "per_type": dict(sorted(COUNTS.items()))}, indent=1))
    print(f"fuzz: {total} cases: {dict(sorted(COUNTS.items()))}")
