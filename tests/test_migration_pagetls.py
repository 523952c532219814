"""This migration's own TLS for CRIU's page connections (:mod:`pycriu.migration.pagetls`).

Over ``ssh://`` and ``tcp://`` the pages travel on CRIU's own connections, encrypted with
certificates that each migration makes: the agent sends a certificate request, the source's
throw-away CA signs it. No private key travels, and a certificate that does not match, or that
another CA signed, is refused. End to end over both transports: test_migration_tcp.py and
test_migration_ssh.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import assert_moved, assert_page_tls

from pycriu import Migration
from pycriu.migration import ProtocolError, pagetls
from pycriu.workload import Workload


def _side(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return d


def test_each_side_gets_a_certificate_for_its_own_key_from_one_ca(tmp_path: Path) -> None:
    ca = pagetls.Authority()
    source = ca.issue_local(_side(tmp_path, "source"))
    agent_dir = _side(tmp_path, "agent")
    request = pagetls.new_request(agent_dir)  # only this travels from the agent ...
    assert "PRIVATE KEY" not in request
    agent = pagetls.install(agent_dir, ca.sign(request), ca.ca_pem)  # ... and this back
    for side in (source, agent):
        assert side.ca.read_text() == ca.ca_pem
        assert (side.key.stat().st_mode & 0o777) == 0o600
        assert side.criu_options()["tls"] is True and side.criu_options()["tls_no_cn_verify"] is True
    assert source.cert.read_text() != agent.cert.read_text()


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    ca = pagetls.Authority()
    mine = _side(tmp_path, "mine")
    pagetls.new_request(mine)
    other = ca.sign(pagetls.new_request(_side(tmp_path, "other")))
    with pytest.raises(ProtocolError, match="not for this side's key"):
        pagetls.install(mine, other, ca.ca_pem)
    assert not (mine / "cert.pem").exists()


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    mine = _side(tmp_path, "mine")
    cert = pagetls.Authority().sign(pagetls.new_request(mine))
    with pytest.raises(ProtocolError, match="not a certificate issued by the given CA"):
        pagetls.install(mine, cert, pagetls.Authority().ca_pem)


def test_a_certificate_naming_the_ca_but_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    mine = _side(tmp_path, "mine")
    request = pagetls.new_request(mine)
    real, forger = pagetls.Authority(), pagetls.Authority()
    forger._name = real._name  # noqa: SLF001 - the forger copies the real CA's name, not its key
    with pytest.raises(ProtocolError, match="not a certificate issued by the given CA"):
        pagetls.install(mine, forger.sign(request), real.ca_pem)


def test_garbage_and_oversized_requests_are_refused() -> None:
    ca = pagetls.Authority()
    with pytest.raises(ProtocolError, match="not a certificate request"):
        ca.sign("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(ProtocolError, match="too large"):
        ca.sign("x" * (pagetls.MAX_PEM + 1))


@needs_root
@needs_lazy_pages
@pytest.mark.criu
def test_a_local_migration_can_ask_for_it(workload: Callable[..., Workload], private_tmp: Path) -> None:
    """``local`` sends the pages in the clear by default (they never leave the host);
    ``criu_tls=True`` encrypts them too, and the keys are gone afterwards."""
    w = workload(mib=16)
    report = Migration(w.pid, to="local", mode="lazy", criu_tls=True, log_dir=private_tmp.parent / "logs").run()
    assert_moved(w, report)
    assert_page_tls(report, "lazy", encrypted=True)
