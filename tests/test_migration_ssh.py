"""``ssh://``: the real OpenSSH client starts the agent on the destination (``--stdio``) through a
real OpenSSH server (Debian's sshd on 127.0.0.1 with generated host and user keys)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import SshServer, assert_disk_figures, assert_moved, assert_page_tls

from pycriu import Migration, TransportError
from pycriu.workload import Workload

pytestmark = [
    needs_root,
    pytest.mark.criu,
    pytest.mark.skipif(shutil.which("ssh") is None or not os.path.exists("/usr/sbin/sshd"),
                       reason="OpenSSH client or server (openssh-server) not installed"),
]

AGENT_COMMAND = [sys.executable, "-m", "pycriu.migration.agent", "--stdio"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    yield server
    server.close()


@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
def test_migrate_over_ssh(workload: Callable[..., Workload], private_tmp: Path, sshd: SshServer, mode: str) -> None:
    w = workload(mib=16)
    report = Migration(w.pid, to=sshd.url, mode=mode, ssh_options=sshd.options, identity_file=sshd.identity,
                       agent_command=AGENT_COMMAND, log_dir=private_tmp.parent / "logs").run()
    assert report.transport == "ssh"
    assert report.destination == sshd.url
    assert_moved(w, report)
    assert_disk_figures(report, mode, 16)
    # OpenSSH carries the control channel; CRIU's page connections get this migration's own TLS
    assert_page_tls(report, mode, encrypted=True)


def test_an_unknown_host_key_is_refused_before_anything_is_frozen(workload: Callable[..., Workload],
                                                                  private_tmp: Path, sshd: SshServer) -> None:
    w = workload(mib=8)
    empty = private_tmp.parent / "empty_known_hosts"
    empty.write_text("")
    options = ["-o", f"UserKnownHostsFile={empty}", "-o", "StrictHostKeyChecking=yes",
               "-o", "GlobalKnownHostsFile=/dev/null", "-F", "/dev/null"]
    logs = private_tmp.parent / "logs"
    with pytest.raises(TransportError) as info:
        Migration(w.pid, to=sshd.url, mode="classic", ssh_options=options, identity_file=sshd.identity,
                  agent_command=AGENT_COMMAND, log_dir=logs).run()
    assert info.value.report.outcome == "refused"  # type: ignore[attr-defined]
    assert "Host key verification failed" in Path(info.value.report.logs["agent stderr"]).read_text()  # type: ignore[attr-defined]
    assert not list(logs.rglob("dump.log"))
    assert w.alive(w.pid)
    w.wait_beats(3)
