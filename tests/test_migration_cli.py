"""``pycriu migrate`` and ``pycriu agent``: the subcommands :func:`pycriu.migration.cli.register`
adds, run as real commands (the JSON report, a progress display on a terminal, exit statuses)."""

from __future__ import annotations

import argparse
import io
import os
import pty
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root
from migration_support import assert_moved

from pycriu import MigrationReport
from pycriu.migration import Progress
from pycriu.migration.cli import ProgressDisplay, register
from pycriu.workload import Workload

PYCRIU = [sys.executable, "-m", "pycriu.migration.cli"]


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).resolve().parent.parent))


def test_register_adds_agent_and_migrate_with_a_func() -> None:
    parser = argparse.ArgumentParser(prog="pycriu")
    parser.add_argument("--json", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["migrate", "123", "--to", "ssh://root@host", "--mode", "lazy", "--flag",
                              "tcp_established"])
    assert (args.pid, args.to, args.mode, args.flag) == (123, "ssh://root@host", "lazy", ["tcp_established"])
    assert callable(args.func)
    args = parser.parse_args(["agent", "--listen", "127.0.0.1:7000", "--secret-file", "/s"])
    assert args.listen == "127.0.0.1:7000" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["migrate", "1", "--mode", "teleport"])


def test_the_progress_display_shows_phases_and_bytes() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    show = ProgressDisplay(out)
    show(Progress("checks", "start", 0.0))
    show(Progress("checks", "end", 0.3, seconds=0.3))
    show(Progress("image transfer", "start", 0.4))
    show(Progress("image transfer", "bytes", 0.5, done=1 << 20, total=4 << 20))
    show(Progress("image transfer", "end", 0.6, seconds=0.2, message="12 files"))
    text = out.getvalue()
    assert "checks" in text and "300.0 ms" in text
    assert "1.0 / 4.0 MiB" in text and "12 files" in text


@needs_root
def test_pycriu_migrate_prints_a_json_report(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8)
    proc = subprocess.run([*PYCRIU, "migrate", str(w.pid), "--to", "local", "--mode", "classic", "--json",
                           "--log-dir", str(private_tmp.parent / "logs")],
                          capture_output=True, env=_env(private_tmp), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    report = MigrationReport.from_json(proc.stdout.decode())
    assert_moved(w, report)


@needs_root
def test_pycriu_migrate_shows_progress_on_a_terminal(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8)
    master, slave = pty.openpty()
    proc = subprocess.Popen([*PYCRIU, "migrate", str(w.pid), "--to", "local", "--mode", "lazy",
                             "--log-dir", str(private_tmp.parent / "logs")],
                            stdout=subprocess.PIPE, stderr=slave, env=_env(private_tmp))
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    for phase in ("checks", "freeze+dump", "image transfer", "restore", "lazy page completion"):
        assert phase in text, text
    assert "outcome:         migrated" in out.decode()
    pid = int(out.decode().split("destination:     running, pid ")[1].split()[0])
    w.adopt(pid)
    w.wait_beats(3)


@needs_root
def test_pycriu_migrate_exit_statuses(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8)
    secret = private_tmp.parent / "secret"
    secret.write_text("0123456789abcdef0123")
    unreachable = subprocess.run([*PYCRIU, "migrate", str(w.pid), "--to", "tcp://127.0.0.1:1",
                                  "--secret-file", str(secret), "--log-dir", str(private_tmp.parent / "logs")],
                                 capture_output=True, env=_env(private_tmp), timeout=60)
    assert unreachable.returncode == 1
    assert b"cannot connect" in unreachable.stderr
    assert b"outcome:         refused" in unreachable.stdout
    no_auth = subprocess.run([*PYCRIU, "migrate", str(w.pid), "--to", "tcp://127.0.0.1:1"],
                             capture_output=True, env=_env(private_tmp), timeout=60)
    assert no_auth.returncode == 2 and b"needs authentication" in no_auth.stderr
    assert w.alive(w.pid)


def test_pycriu_agent_needs_a_mode() -> None:
    proc = subprocess.run([*PYCRIU, "agent"], capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"--stdio" in proc.stderr
