"""``tcp://`` agents: authenticated by a shared secret (HMAC challenge-response, then a MAC on
every frame) or by TLS with client certificates. Whoever cannot authenticate is refused before
anything is frozen; plain unauthenticated TCP is refused by both sides."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import (
    AGENT,
    Relay,
    TcpAgent,
    assert_disk_figures,
    assert_moved,
    assert_page_tls,
    make_certs,
)

from pycriu import AuthenticationError, InvalidOptionError, Migration, PageServerAddress, TLSConfig, TransportError
from pycriu.migration import controltls
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

SECRET = b"s3cret-for-the-tcp-tests-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def secret_agent(tmp_path: Path) -> Iterator[TcpAgent]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    agent = TcpAgent(tmp_path / "agent", "--secret-file", str(secret))
    yield agent
    agent.close()


@pytest.fixture
def tls_agent(tmp_path: Path, certs: dict[str, Path]) -> Iterator[TcpAgent]:
    agent = TcpAgent(tmp_path / "agent", "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]),
                     "--tls-ca", str(certs["ca"]))
    yield agent
    agent.close()


def _never_frozen(w: Workload, log_dir: Path, agent: TcpAgent) -> None:
    assert w.alive(w.pid)
    assert not list(log_dir.rglob("dump.log")), "CRIU dumped although authentication failed"
    assert not list(agent.root.glob("s-*")), "the agent opened a session for an unauthenticated peer"
    w.wait_beats(3)


@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
def test_migrate_over_tcp_with_a_shared_secret(workload: Callable[..., Workload], private_tmp: Path,
                                               secret_agent: TcpAgent, mode: str) -> None:
    w = workload(mib=16)
    report = Migration(w.pid, to=secret_agent.url, mode=mode, secret=SECRET, log_dir=private_tmp.parent / "logs").run()
    assert report.transport == "tcp+secret+tls"
    assert_moved(w, report)
    assert_disk_figures(report, mode, 16)
    # the secret protects the control channel; CRIU's page connections get this migration's own TLS
    assert_page_tls(report, mode, encrypted=True)


@pytest.mark.parametrize(("mode", "criu_tls"), [pytest.param("lazy", None, marks=needs_lazy_pages),
                                               pytest.param("lazy", False, marks=needs_lazy_pages),
                                               ("page-server", None), ("page-server", False)])
def test_a_wire_tap_sees_tls_on_the_page_connection_unless_turned_off(
        workload: Callable[..., Workload], private_tmp: Path, secret_agent: TcpAgent, mode: str,
        criu_tls: bool | None) -> None:
    """CRIU's page connection, through a relay that records what crosses it: it opens with a TLS
    handshake record (0x16 0x03) by default over ``tcp://``, with CRIU's own plaintext with
    ``criu_tls=False``; and the pages the report counts are the bytes that crossed it."""
    w = workload(mib=16)
    relays: list[Relay] = []

    def tap(address: PageServerAddress) -> PageServerAddress:
        relays.append(Relay((address.address, address.port)))
        return PageServerAddress("127.0.0.1", relays[-1].port)

    try:
        report = Migration(w.pid, to=secret_agent.url, mode=mode, secret=SECRET, relay=tap, criu_tls=criu_tls,
                           log_dir=private_tmp.parent / "logs").run()
        assert_moved(w, report)
        assert len(relays) == 1
        # pages flow to the connecting side in the lazy flow (the destination asks the source),
        # from it in the page-server flow (the source's dump sends them)
        wire = relays[0].forwarded if mode == "lazy" else relays[0].returned
        # the report's page bytes (pages x page size) against what crossed the wire: CRIU's
        # headers and TLS records add 0.03 % and 0.2 % here; 1 % is allowed
        sent = report.bytes["page_server"]
        assert 16 << 20 <= sent <= wire <= sent * 1.01 + (64 << 10), (sent, wire)
        assert (relays[0].first[:2] == b"\x16\x03") == (criu_tls is None)
        assert_page_tls(report, mode, encrypted=criu_tls is None)
    finally:
        for relay in relays:
            relay.close()


def test_a_wrong_secret_is_refused_before_anything_is_frozen(workload: Callable[..., Workload], private_tmp: Path,
                                                             secret_agent: TcpAgent) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    with pytest.raises(AuthenticationError, match="refused the shared secret") as info:
        Migration(w.pid, to=secret_agent.url, mode="classic", secret=b"not-the-right-secret!", log_dir=logs).run()
    assert info.value.report.outcome == "refused"  # type: ignore[attr-defined]
    _never_frozen(w, logs, secret_agent)
    # the agent is still there for the next (authenticated) client
    report = Migration(w.pid, to=secret_agent.url, mode="classic", secret=SECRET, log_dir=logs).run()
    assert_moved(w, report)


def test_a_raw_peer_that_skips_authentication_is_refused(secret_agent: TcpAgent) -> None:
    raw = socket.create_connection(("127.0.0.1", secret_agent.port), timeout=10)
    with controltls.client_context().wrap_socket(raw) as s:  # the agent speaks TLS first
        f = s.makefile("rb")
        kind, length = f.read(1)[0], int.from_bytes(f.read(4), "big")
        welcome = json.loads(f.read(length))
        assert kind == 1 and welcome["type"] == "welcome" and welcome["auth"] == "secret"
        hello = json.dumps({"type": "hello", "protocol": 1}).encode()
        s.sendall(bytes([1]) + len(hello).to_bytes(4, "big") + hello)
        kind, length = f.read(1)[0], int.from_bytes(f.read(4), "big")
        reply = json.loads(f.read(length))
        assert reply["type"] == "error" and reply["code"] == "auth-failed"
        assert f.read(1) == b""  # and it hung up
    assert not list(secret_agent.root.glob("s-*"))


def test_a_client_without_the_secret_is_refused(workload: Callable[..., Workload], private_tmp: Path,
                                                secret_agent: TcpAgent, certs: dict[str, Path]) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    # TLS towards a plain agent: the handshake fails, nothing is frozen
    tls = TLSConfig(str(certs["client"]), str(certs["client_key"]), str(certs["ca"]))
    with pytest.raises(TransportError):
        Migration(w.pid, to=secret_agent.url, mode="classic", tls=tls, log_dir=logs).run()
    _never_frozen(w, logs, secret_agent)


def test_plain_tcp_without_authentication_is_refused_by_both_sides(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="needs authentication"):
        Migration(1, to="tcp://127.0.0.1:1")
    proc = subprocess.run([*AGENT, "--listen", "127.0.0.1:0", "--root", str(tmp_path / "r")],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert b"refusing to listen without authentication" in proc.stderr


@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
def test_migrate_over_tls_with_mutual_authentication(workload: Callable[..., Workload], private_tmp: Path,
                                                     tls_agent: TcpAgent, certs: dict[str, Path], mode: str) -> None:
    w = workload(mib=16)
    tls = TLSConfig(str(certs["client"]), str(certs["client_key"]), str(certs["ca"]))
    report = Migration(w.pid, to=tls_agent.url, mode=mode, tls=tls, log_dir=private_tmp.parent / "logs").run()
    assert report.transport == "tcp+tls"
    assert_moved(w, report)
    assert_disk_figures(report, mode, 16)
    # CRIU's own page connection (classic has none) ran inside TLS too, with the same certificates
    assert_page_tls(report, mode, encrypted=True)


def test_tls_refuses_a_client_certificate_from_another_ca(workload: Callable[..., Workload], private_tmp: Path,
                                                          tls_agent: TcpAgent, certs: dict[str, Path]) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    rogue = TLSConfig(str(certs["rogue"]), str(certs["rogue_key"]), str(certs["ca"]))
    with pytest.raises(TransportError):
        Migration(w.pid, to=tls_agent.url, mode="classic", tls=rogue, log_dir=logs).run()
    _never_frozen(w, logs, tls_agent)


def test_tls_client_checks_the_agent_certificate(workload: Callable[..., Workload], private_tmp: Path,
                                                 tls_agent: TcpAgent, certs: dict[str, Path]) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    trusting_another_ca = TLSConfig(str(certs["client"]), str(certs["client_key"]), str(certs["rogue_ca"]))
    with pytest.raises(TransportError, match="TLS handshake"):
        Migration(w.pid, to=tls_agent.url, mode="classic", tls=trusting_another_ca, log_dir=logs).run()
    _never_frozen(w, logs, tls_agent)


def test_the_agent_listens_on_loopback_by_default(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    env_path = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([*AGENT, "--listen", ":0", "--root", str(tmp_path / "r"), "--secret-file", str(secret)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PYTHONPATH": env_path,
                                                                                     "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().startswith("pycriu agent listening on 127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert sys.executable


def test_silent_and_slow_peers_do_not_delay_an_authenticated_migration(
        workload: Callable[..., Workload], private_tmp: Path, secret_agent: TcpAgent) -> None:
    """Peers that connect and say nothing, or send one byte now and then, each hold only their
    own handshake: a migration that authenticates is served while they are all still waiting
    (each would otherwise hold the agent for its 30 s authentication timeout)."""
    silent = [socket.create_connection(("127.0.0.1", secret_agent.port), timeout=5) for _ in range(6)]
    half_tls = socket.create_connection(("127.0.0.1", secret_agent.port), timeout=5)
    slow = controltls.client_context().wrap_socket(socket.create_connection(("127.0.0.1", secret_agent.port),
                                                                            timeout=5))
    try:
        half_tls.sendall(b"\x16\x03")  # the start of a TLS record, and nothing more
        slow.recv(4096)  # the welcome, inside TLS
        slow.sendall(b"\x01")  # the first byte of a frame header, and nothing more
        w = workload(mib=8)
        report = Migration(w.pid, to=secret_agent.url, mode="classic", secret=SECRET,
                           log_dir=private_tmp.parent / "logs").run()
        assert report.outcome == "migrated"
        assert_moved(w, report)
        for peer in [*silent, half_tls, slow]:  # none was served first
            peer.setblocking(False)
            with pytest.raises((BlockingIOError, ssl.SSLWantReadError)):
                while peer.recv(4096):  # nothing: not closed, not refused
                    pass
    finally:
        for peer in [*silent, half_tls, slow]:
            peer.close()
