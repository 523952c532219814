"""The ``pycriu`` command line: doctor, dump and restore on a real process, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import needs_root

from pycriu.workload import Workload

PYCRIU = [sys.executable, "-m", "pycriu"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYCRIU, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("doctor", "dump", "restore", "page-server", "lazy-pages"):
        assert command in out.stdout


def test_bad_usage_exits_2() -> None:
    out = run("dump", "-D", "/tmp")  # no -t
    assert out.returncode == 2
    assert "--tree" in out.stderr


@needs_root
def test_doctor_says_ready_and_lists_flows() -> None:
    out = run("doctor", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ready"] is True
    names = {c["name"]: c["verdict"] for c in report["checks"]}
    assert names["criu check"] == "ok"
    assert names["root"] == "ok"
    assert report["flows"]["classic"] == "available"
    assert set(report["flows"]) == {"classic", "page-server", "lazy", "page-server-on-source", "pre-copy", "hybrid"}


@needs_root
def test_dump_and_restore_from_the_command_line(workload: Callable[..., Workload], images_dir: Path,
                                               tmp_path: Path) -> None:
    w = workload(mib=8)
    dump = run("dump", "-t", str(w.pid), "-D", str(images_dir), "--json")
    assert dump.returncode == 0, dump.stderr
    assert json.loads(dump.stdout)["stats"]["pages_written"] > 0
    assert not w.alive()

    pidfile = tmp_path / "pid"
    restore = run("restore", "-D", str(images_dir), "--pidfile", str(pidfile))
    assert restore.returncode == 0, restore.stderr
    pid = int(pidfile.read_text())
    w.adopt(pid)
    assert f"restored: pid {pid}" in restore.stdout
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum


@needs_root
def test_failure_prints_criu_message_log_and_hint(tmp_path: Path) -> None:
    out = run("dump", "-t", "999999", "-D", str(tmp_path))
    assert out.returncode == 1
    assert "no process with pid 999999" in out.stderr
    assert "hint:" in out.stderr


@needs_root
def test_unsafe_criu_option_is_refused(workload: Callable[..., Workload], images_dir: Path) -> None:
    w = workload(mib=8)
    out = run("dump", "-t", str(w.pid), "-D", str(images_dir), "--criu-opt", "lsm-profile=x#y")
    assert out.returncode == 2
    assert "cannot be passed safely" in out.stderr
    assert w.alive()


def test_a_malformed_inherit_fd_is_a_usage_error() -> None:
    out = run("restore", "-D", "/tmp", "--inherit-fd", "fd[x]:key")
    assert out.returncode == 2
    assert "expected fd[N]:KEY" in out.stderr
