"""Nothing readable on the wire: over ``tcp://`` the control channel (in classic mode it carries
the process's memory) runs inside TLS by default, also with nothing but a shared secret, whose
proofs are bound to the agent's certificate so that a machine in the middle is refused. A wire tap
between source and agent sees TLS records and neither the workload's memory nor an image's name;
with the explicit ``insecure_plaintext`` opt-out of both sides it sees both (the tap works). The
secret never appears in a report, a log, an exception or a process's command line."""

from __future__ import annotations

import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import Relay, TcpAgent, assert_moved

from pycriu import AuthenticationError, Migration, TransportError
from pycriu.migration import Progress, controltls
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

SECRET = b"wire-tap-secret-0123456789abcdef"
MODES = ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
         pytest.param("page-server-on-source", marks=needs_lazy_pages)]


def _memory_marker() -> bytes:
    """64 bytes of every workload's memory (seed 1: pycriu.workload fills it from this stream)."""
    return random.Random(1).randbytes(1 << 20)[5000:5064]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def agent(tmp_path: Path, secret_file: Path) -> Iterator[TcpAgent]:
    a = TcpAgent(tmp_path / "agent", "--secret-file", str(secret_file))
    yield a
    a.close()


@pytest.fixture
def plaintext_agent(tmp_path: Path, secret_file: Path) -> Iterator[TcpAgent]:
    a = TcpAgent(tmp_path / "agent", "--secret-file", str(secret_file), "--insecure-plaintext")
    yield a
    a.close()


def _tapped(w: Workload, agent: TcpAgent, mode: str, logs: Path, **kw: object) -> tuple[Relay, object]:
    tap = Relay(("127.0.0.1", agent.port), record=True)
    try:
        report = Migration(w.pid, to=f"tcp://127.0.0.1:{tap.port}", mode=mode, secret=SECRET, log_dir=logs,
                           **kw).run()  # type: ignore[arg-type]
    finally:
        tap.close()
    return tap, report


@pytest.mark.parametrize("mode", MODES)
def test_a_wire_tap_on_the_control_channel_sees_only_tls(
        workload: Callable[..., Workload], private_tmp: Path, agent: TcpAgent, mode: str) -> None:
    w = workload(mib=8)
    tap, report = _tapped(w, agent, mode, private_tmp.parent / "logs")
    assert report.transport == "tcp+secret+tls"  # type: ignore[attr-defined]
    assert_moved(w, report)  # type: ignore[arg-type]
    wire = bytes(tap.sent) + bytes(tap.received)
    assert tap.sent[:2] == b"\x16\x03" and tap.received[:2] == b"\x16\x03", "not a TLS handshake"
    assert len(tap.sent) > 4096 and len(tap.received) > 1024, "the tap saw (almost) nothing"
    for plain in (b"inventory.img", b"pstree.img", b'"type"', b"welcome", _memory_marker(), SECRET):
        assert plain not in wire, f"{plain[:20]!r} crossed the wire in the clear"


def test_with_the_explicit_opt_out_the_tap_reads_the_memory(
        workload: Callable[..., Workload], private_tmp: Path, plaintext_agent: TcpAgent) -> None:
    """The control of the test above: the same tap, both sides opted out, reads everything."""
    w = workload(mib=8)
    tap, report = _tapped(w, plaintext_agent, "classic", private_tmp.parent / "logs", insecure_plaintext=True)
    assert report.transport == "tcp+secret+plaintext"  # type: ignore[attr-defined]
    assert_moved(w, report)  # type: ignore[arg-type]
    assert b"inventory.img" in tap.sent and _memory_marker() in tap.sent
    assert SECRET not in tap.sent + tap.received  # the secret itself never travels, even then


def test_one_side_opting_out_alone_fails_before_the_freeze(
        workload: Callable[..., Workload], private_tmp: Path, agent: TcpAgent, plaintext_agent: TcpAgent) -> None:
    w = workload(mib=8)
    with pytest.raises(TransportError, match="TLS handshake") as info:
        Migration(w.pid, to=plaintext_agent.url, mode="classic", secret=SECRET, timeout=10,
                  log_dir=private_tmp.parent / "logs").run()
    assert "--insecure-plaintext" in (info.value.hint or "")
    assert info.value.report.outcome == "refused"  # type: ignore[attr-defined]
    w.wait_beats(3)


class _Interceptor:
    """A machine in the middle: it ends the source's TLS with its own certificate and opens its
    own TLS to the agent, passing everything through (it does not know the secret)."""

    def __init__(self, agent_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.agent_port = agent_port
        self.identity = controltls.AgentIdentity()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            down, _ = self.server.accept()
            down = self.identity.server_context().wrap_socket(down, server_side=True)
            up = controltls.client_context().wrap_socket(socket.create_connection(("127.0.0.1", self.agent_port)))
        except (OSError, ssl.SSLError):
            return
        threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
        self._pump(up, down)

    @staticmethod
    def _pump(src: ssl.SSLSocket, dst: ssl.SSLSocket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def test_a_machine_in_the_middle_is_refused_by_both_sides(
        workload: Callable[..., Workload], private_tmp: Path, agent: TcpAgent) -> None:
    w = workload(mib=8)
    mitm = _Interceptor(agent.port)
    logs = private_tmp.parent / "logs"
    try:
        with pytest.raises(AuthenticationError) as info:
            Migration(w.pid, to=f"tcp://127.0.0.1:{mitm.port}", mode="classic", secret=SECRET, log_dir=logs).run()
    finally:
        mitm.close()
    assert info.value.report.outcome == "refused"  # type: ignore[attr-defined]
    assert not list(logs.rglob("dump.log")), "CRIU dumped although the agent was not authenticated"
    assert not list(agent.root.glob("s-*")), "the agent opened a session for the interceptor"
    w.wait_beats(3)
    # the honest path still works at once
    report = Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, log_dir=logs).run()
    assert_moved(w, report)


def _everything_readable(pattern: bytes) -> list[str]:
    """Every process's command line and environment that contains ``pattern``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for what in ("cmdline", "environ"):
            try:
                if pattern in (proc / what).read_bytes():
                    found.append(f"{proc.name}/{what}")
            except OSError:
                continue
    return found


def test_the_secret_is_in_no_report_log_exception_or_process_title(
        workload: Callable[..., Workload], private_tmp: Path, agent: TcpAgent) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    seen: list[str] = []

    def look(e: Progress) -> None:  # while CRIU and the agent's children run
        if e.event == "start" and e.phase in ("dump", "restore"):
            seen.extend(_everything_readable(SECRET))

    report = Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, log_dir=logs, progress=look).run()
    assert_moved(w, report)
    assert not seen, f"the secret is readable in /proc: {seen}"
    assert SECRET.decode() not in report.to_json() and SECRET.decode() not in str(report)
    for path in [*logs.rglob("*"), agent.root.parent / f"{agent.root.name}-agent.log"]:
        if path.is_file():
            assert SECRET not in path.read_bytes(), f"the secret is in {path}"
    wrong = b"a-wrong-secret-of-32-bytes-xxxxx"
    with pytest.raises(AuthenticationError) as info:
        Migration(w.pid, to=agent.url, mode="classic", secret=wrong, log_dir=logs).run()
    text = f"{info.value} {info.value.hint} {info.value!r} {info.value.report.to_json()}"  # type: ignore[attr-defined]
    assert SECRET.decode() not in text and wrong.decode() not in text
    assert "the agent refused the shared secret" in str(info.value)
