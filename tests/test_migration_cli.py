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
from pycriu.migration.phases import RateMeter
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
    assert "1.0 / 4.0 MiB (25%)" in text and "12 files" in text


def test_off_a_terminal_a_transfer_prints_a_line_every_few_seconds_with_rate_and_time_left() -> None:
    out = io.StringIO()  # a log file or a pipe: no terminal
    show = ProgressDisplay(out, every=3.0)
    show(Progress("page transfer", "start", 0.0))
    for tenth in range(1, 101):  # 10 s at 10 MiB/s of 200 MiB
        show(Progress("page transfer", "bytes", tenth / 10, done=tenth << 20, total=200 << 20))
    show(Progress("page transfer", "end", 10.0, seconds=10.0))
    lines = [line for line in out.getvalue().splitlines() if "MiB/s" in line]
    assert len(lines) == 3  # at 3, 6 and 9 s
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert "30.0 / 200.0 MiB (15%), 10.0 MiB/s, 17.0 s left" in lines[0]


def test_the_rate_is_that_of_the_last_seconds_and_restarts_with_a_new_transfer() -> None:
    meter = RateMeter(window=2.0)
    assert meter.update(0.0, 0, 100) == (None, None)
    for t in range(1, 11):  # 1 byte/s for 10 s...
        meter.update(float(t), t, 100)
    for t in range(11, 14):  # ...then 11 bytes/s
        rate, left = meter.update(float(t), 10 + 11 * (t - 10), 100)
    assert rate == pytest.approx(11.0, rel=0.01)
    assert left == pytest.approx((100 - 43) / rate)
    assert meter.update(14.0, 5, None)[1] is None  # fewer bytes: another transfer, no total


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


@needs_root
def test_pycriu_migrate_dry_run_names_the_rollback(workload: Callable[..., Workload], private_tmp: Path) -> None:
    """``--dry-run`` says what a failure would come back from; ``--same-host-rollback`` picks it."""
    plain, server = workload(mib=8), workload(mib=8, listen=0)

    def dry(w: Workload, mode: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*PYCRIU, "migrate", str(w.pid), "--mode", mode, "--dry-run", "-q", *extra],
                              capture_output=True, env=_env(private_tmp), timeout=120)

    for mode, plan in (("classic", b"the source's images"), ("lazy", b"the stopped source")):
        default = dry(plain, mode)
        assert default.returncode == 0, default.stderr.decode()
        assert b"rollback plan:   " + plan in default.stdout, default.stdout.decode()
    kept = dry(plain, "classic", "--same-host-rollback", "stopped-source")
    assert b"rollback plan:   the stopped source" in kept.stdout, kept.stdout.decode()
    refused = dry(server, "classic", "--same-host-rollback", "stopped-source")
    assert refused.returncode == 1
    assert b"'stopped-source' keeps the source holding listening TCP port" in refused.stderr + refused.stdout
    assert b"rollback plan" not in refused.stdout
    bad = dry(plain, "classic", "--same-host-rollback", "never")
    assert bad.returncode == 2 and b"invalid choice: 'never'" in bad.stderr
    server.wait_beats(2)  # never frozen
    plain.wait_beats(2)


def test_pycriu_agent_needs_a_mode() -> None:
    proc = subprocess.run([*PYCRIU, "agent"], capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"--stdio" in proc.stderr
