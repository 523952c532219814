"""The pre-flight: before the source freezes, the destination checks that it has what the live
tree needs (the same files, free ports, free socket paths); a problem ends the migration with a
PreflightError naming each resource, and the workload's heartbeat never stops. ``dry_run()``
(``pycriu migrate --dry-run``) gives the same verdict without migrating.

The destination here is an agent on this host reached over ``tcp://`` (so it checks, unlike a
``local`` one), in a mount namespace of its own where the workload's directory looks different.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, needs_root
from migration_support import TcpAgent

import pycriu
from pycriu.migration import Migration, PreflightError, ProtocolError, preflight
from pycriu.migration.preflight import problems, request
from pycriu.migration.procs import TreeResources
from pycriu.workload import Workload

SECRET = b"s3cret-for-the-preflight-tests-0123"


# --- the destination's checks, without root ---------------------------------------------------------


def _ask(files: dict[str, int] | None = None, ports: list[int] | None = None,
         paths: list[str] | None = None) -> list[str]:
    resources = TreeResources(files=files or {}, tcp_ports=dict.fromkeys(ports or [], 1),
                              unix_paths=dict.fromkeys(paths or [], 1))
    return problems(request(resources), same_host=False)


def test_the_same_files_pass_and_other_files_are_named(tmp_path: Path) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    same.write_bytes(b"x" * 10)
    other.write_bytes(b"x" * 5)
    found = _ask(files={str(same): 10, str(other): 10, str(tmp_path / "gone"): 3, str(tmp_path): 4096})
    assert sorted(found) == sorted([
        f"{other}: 5 bytes on the destination, 10 on the source (CRIU restores a file only if it is the same file)",
        f"{tmp_path / 'gone'}: missing on the destination (the tree holds it open or maps it; 3 bytes on the source)",
        f"{tmp_path}: not a regular file on the destination"])


def test_a_port_something_listens_on_is_named() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert _ask(ports=[port]) == [f"TCP port {port}: already in use on the destination (the tree listens on it)"]
    assert _ask(ports=[port]) == []


def test_a_socket_path_another_process_serves_is_named_a_stale_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        assert _ask(paths=[path]) == [f"{path}: another process serves this Unix socket path on the destination"]
    assert _ask(paths=[path]) == []  # the file is left, nobody serves it: CRIU unlinks and binds it
    missing = str(tmp_path / "no" / "sock")
    assert _ask(paths=[missing]) == [f"{missing}: its directory {tmp_path / 'no'} is missing on the destination "
                                     "(the tree's Unix socket is bound there)"]


def test_on_one_host_nothing_is_checked(tmp_path: Path) -> None:
    msg = request(TreeResources(files={str(tmp_path / "gone"): 1}))
    assert problems(msg, same_host=True) == []


@pytest.mark.parametrize("msg", [
    {"files": [{"path": "relative", "size": 1}], "tcp_ports": [], "unix_paths": []},
    {"files": [{"path": "/x", "size": -1}], "tcp_ports": [], "unix_paths": []},
    {"files": [{"path": "/x", "size": True}], "tcp_ports": [], "unix_paths": []},
    {"files": [{"path": "/x", "size": 1, "extra": 1}], "tcp_ports": [], "unix_paths": []},
    {"files": [], "tcp_ports": [0], "unix_paths": []},
    {"files": [], "tcp_ports": [70000], "unix_paths": []},
    {"files": [], "tcp_ports": ["80"], "unix_paths": []},
    {"files": [], "tcp_ports": [], "unix_paths": ["/a\x00b"]},
    {"files": "all", "tcp_ports": [], "unix_paths": []},
])
def test_malformed_requests_are_refused(msg: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match="preflight"):
        problems(msg, same_host=False)


# --- end to end: real agent, real workload ----------------------------------------------------------

needs_unshare = pytest.mark.skipif(not IS_ROOT, reason="not root: the agent's own mount namespace needs root")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    return d


def _agent(tmp_path: Path, setup: str = "") -> TcpAgent:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} exec "$0" "$@"'] if setup else []
    return TcpAgent(tmp_path / "agent", "--secret-file", str(secret), wrap=wrap)


@pytest.fixture
def workload_in(src: Path) -> Iterator[list[Workload]]:
    made: list[Workload] = []
    yield made
    for w in made:
        w.close()


def _refused_before_the_freeze(w: Workload, logs: Path, agent: TcpAgent, match: str) -> PreflightError:
    before = w.wait_beats(1)["beat"]
    with pytest.raises(PreflightError, match=match) as info:
        Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, log_dir=logs).run()
    assert not list(logs.rglob("dump.log")), "CRIU dumped although the pre-flight found a problem"
    report = info.value.report  # type: ignore[attr-defined]
    assert (report.outcome, report.source_state) == ("refused", "running (never frozen)")
    assert w.wait_beats(3)["beat"] > before
    return info.value


@needs_root
def test_a_port_taken_on_the_destination_is_found_before_the_freeze(
        tmp_path: Path, src: Path, workload_in: list[Workload], private_tmp: Path) -> None:
    """The agent shares this host's network: the port the workload listens on is taken there."""
    w = Workload(src / "state", mib=8, listen=0)
    workload_in.append(w)
    agent = _agent(tmp_path)
    try:
        port = w.wait_beats(1)["port"]
        err = _refused_before_the_freeze(w, private_tmp.parent / "logs", agent, f"TCP port {port}: already in use")
        assert err.resources == (f"TCP port {port}: already in use on the destination (the tree listens on it)",)
        assert err.hint is not None and "nothing was frozen" in err.hint
    finally:
        agent.close()


@needs_unshare
@pytest.mark.parametrize("setup", ["missing", "other size"])
def test_a_file_missing_or_different_on_the_destination_is_found_before_the_freeze(
        tmp_path: Path, src: Path, workload_in: list[Workload], private_tmp: Path, setup: str) -> None:
    """The workload holds its state file open; in the agent's view of the filesystem that
    directory is an empty tmpfs (or holds a shorter file of that name)."""
    w = Workload(src / "state", mib=8)
    workload_in.append(w)
    make = f"mount -t tmpfs tmpfs {src} &&"
    if setup == "other size":
        make += f" head -c 10 /dev/zero > {src}/state &&"
    agent = _agent(tmp_path, make)
    try:
        match = "missing on the" if setup == "missing" else "10 bytes on the destination, 4096 on the source"
        err = _refused_before_the_freeze(w, private_tmp.parent / "logs", agent, match)
        assert any(str(src / "state") in r for r in err.resources)
    finally:
        agent.close()


@needs_root
def test_a_dry_run_says_what_would_run_and_freezes_nothing(
        tmp_path: Path, src: Path, workload_in: list[Workload], private_tmp: Path) -> None:
    w = Workload(src / "state", mib=8)
    workload_in.append(w)
    agent = _agent(tmp_path)
    try:
        before = w.wait_beats(1)["beat"]
        logs = private_tmp.parent / "logs"
        report = Migration(w.pid, to=agent.url, mode="auto", secret=SECRET, log_dir=logs).dry_run()
        assert (report.outcome, report.source_state) == ("checked", "running (never frozen)")
        assert report.mode in ("lazy", "page-server") and report.mode_reason.startswith("auto")
        assert any(n.startswith("pre-flight: the destination has the") and "criu cpuinfo check" in n
                   for n in report.notes), report.notes
        assert not list(logs.rglob("dump.log"))
        assert w.wait_beats(3)["beat"] > before
        secret = tmp_path / "secret"
        out = subprocess.run([sys.executable, "-m", "pycriu.migration.cli", "migrate", str(w.pid), "--to", agent.url,
                              "--secret-file", str(secret), "--dry-run", "--log-dir", str(logs)],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
        assert out.returncode == 0, out.stderr
        assert "outcome:         checked" in out.stdout
        assert w.alive(w.pid)
    finally:
        agent.close()


@needs_root
def test_the_destination_checks_the_source_s_cpu_with_criu(tmp_path: Path) -> None:
    """This CPU's ``criu cpuinfo dump`` image passes ``criu cpuinfo check`` here; an image CRIU
    cannot match is a problem that quotes CRIU."""
    criu = pycriu.Criu().binary
    image = preflight.cpuinfo_image(criu)
    assert image is not None and image[:4] != b"\0\0\0\0"
    assert preflight.cpu_problem(criu, base64.b64encode(image).decode(), tmp_path) is None
    other = image[:8] + bytes(b ^ 0xFF for b in image[8:])  # CRIU's magic kept, the entry another CPU's
    said = preflight.cpu_problem(criu, base64.b64encode(other).decode(), tmp_path)
    assert said is not None and said.startswith("the destination's CPU does not offer") and "criu cpuinfo check" in said
    assert not list(tmp_path.iterdir())  # its scratch directory is gone
    with pytest.raises(ProtocolError, match="not base64"):
        preflight.cpu_problem(criu, "@@@", tmp_path)
