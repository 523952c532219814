"""Endurance: one workload migrated back and forth between two agents, each in its own network
namespace (two "hosts" joined by a veth pair), in classic and in lazy, every migration verified
(memory checksum, heartbeat going on) and run as an operator would, with ``pycriu migrate`` on
the host that holds the process. What the agents, the host and the process hold is measured
before, during and after: open fds and processes of both agents, the process's own fds, mounts,
pycriu's files in ``/dev/shm`` and the disk under both agents' roots and the source's scratch
directory. The test fails on growth.

``PYCRIU_SOAK_ROUNDS`` migrations per mode (default 8 in ``make test``); ``make soak`` runs 200.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import TcpAgent

from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

ROUNDS = int(os.environ.get("PYCRIU_SOAK_ROUNDS", "8"))
SECRET = b"soak-secret-0123456789abcdefghij"
HOSTS = {"pycriu-soak-a": ("psk-a", "10.213.79.1"), "pycriu-soak-b": ("psk-b", "10.213.79.2")}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _delete() -> None:
    for ns in HOSTS:
        if os.path.exists(f"/run/netns/{ns}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[str]]:
    """Two network namespaces joined by a veth pair (10.213.79.1 and .2); always deleted."""
    _delete()
    try:
        (a, (ifa, addra)), (b, (ifb, addrb)) = HOSTS.items()
        for ns in HOSTS:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", ifa, "type", "veth", "peer", "name", ifb, "netns", b)
        for ns, (dev, addr) in HOSTS.items():
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield [a, b]
    finally:
        _delete()


@pytest.fixture
def agents(hosts: list[str], tmp_path: Path) -> Iterator[dict[str, TcpAgent]]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    made: dict[str, TcpAgent] = {}
    try:
        for ns in hosts:
            made[ns] = TcpAgent(tmp_path / f"root-{ns}", "--secret-file", str(secret),
                                wrap=["nsenter", f"--net=/run/netns/{ns}"], listen=f"{HOSTS[ns][1]}:0")
        yield made
    finally:
        for agent in made.values():
            agent.close()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _ours_in_shm(agents: dict[str, TcpAgent], w: Workload) -> list[str]:
    """This test's entries in /dev/shm (other test runs on the machine may have theirs): the
    sources' (named with the migrated pid) and the agents' sessions' (named with the session)."""
    sessions = set()
    for agent in agents.values():
        sessions |= set(re.findall(r"(s-[0-9a-f]{8}): session for", Path(agent.log.name).read_text(errors="replace")))
    prefixes = tuple([f"pycriu-migrate-{p}-" for p in w._tree.pids] + [f"pycriu-migrate-tls-{p}-" for p in w._tree.pids]
                     + [f"pycriu-agent-{s}-" for s in sessions])
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefixes)]


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


@dataclass
class Gauges:
    """What is measured after each migration."""

    rows: list[dict[str, int]] = field(default_factory=list)

    def take(self, agents: dict[str, TcpAgent], w: Workload, scratch: Path) -> dict[str, int]:
        row = {"fds of the process": len(os.listdir(f"/proc/{w.pid}/fd")),
               "mounts": len(Path("/proc/self/mountinfo").read_text().splitlines()),
               "our entries in /dev/shm": len(_ours_in_shm(agents, w)),
               "bytes under the source's scratch": _disk(scratch)}
        for ns, agent in agents.items():
            row[f"fds of agent {ns[-1]}"] = len(os.listdir(f"/proc/{agent.proc.pid}/fd"))
            row[f"processes of agent {ns[-1]}"] = len(_descendants(agent.proc.pid))
            row[f"bytes under agent {ns[-1]}"] = _disk(agent.root)
        self.rows.append(row)
        return row

    def assert_flat(self) -> None:
        """After the first two migrations (warm-up), nothing may grow: every later value is at
        most the warm value, plus a small allowance for fds and a kept log."""
        warm = {k: max(r[k] for r in self.rows[:2]) for k in self.rows[0]}
        allowance = {k: (4 if "fds" in k else 1 if "entries" in k or "processes" in k else 0) for k in warm}
        for i, row in enumerate(self.rows[2:], start=3):
            grew = {k: (warm[k], v) for k, v in row.items()
                    if v > warm[k] + allowance[k] and not k.startswith("bytes")}
            assert not grew, f"after migration {i}: grew (warm, now): {grew}"
        last = self.rows[-1]
        for k, v in last.items():
            if k.startswith("bytes under agent") or k == "bytes under the source's scratch":
                assert v == 0, f"{k}: {v} bytes left after {len(self.rows)} migrations"


def _migrate(pid: int, source: str, agent: TcpAgent, mode: str, secret: Path, scratch: Path) -> dict[str, object]:
    """``pycriu migrate`` run on the "host" ``source`` (its network namespace)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), TMPDIR=str(scratch))
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{source}", sys.executable, "-m", "pycriu", "migrate",
                           str(pid), "--to", agent.url, "--mode", mode, "--secret-file", str(secret), "--json",
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"migration failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    report: dict[str, object] = json.loads(proc.stdout)
    return report


@pytest.mark.parametrize("mode", ["classic", pytest.param("lazy", marks=needs_lazy_pages)])
def test_migrations_back_and_forth_leave_nothing_growing(
        hosts: list[str], agents: dict[str, TcpAgent], tmp_path: Path, mode: str) -> None:
    secret = tmp_path / "secret"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    w = Workload(tmp_path / "state", mib=8, netns=hosts[0])
    gauges = Gauges()
    seconds = []
    try:
        expected = w.expected_checksum
        gauges.take(agents, w, scratch)  # before
        here = 0
        for i in range(ROUNDS):
            there = 1 - here
            beat = w.wait_beats(1)["beat"]
            t0 = time.monotonic()
            report = _migrate(w.pid, hosts[here], agents[hosts[there]], mode, secret, scratch)
            seconds.append(time.monotonic() - t0)
            assert report["outcome"] == "migrated" and report["mode"] == mode, report
            w.adopt(int(report["destination_pid"]))  # type: ignore[call-overload]
            after = w.wait_beats(2)
            assert after["beat"] > beat, f"migration {i + 1}: no heartbeat after it"
            assert w.checksum() == expected, f"migration {i + 1}: memory differs"
            gauges.take(agents, w, scratch)
            here = there
        time.sleep(1.0)
        gauges.take(agents, w, scratch)  # after
    finally:
        w.close()
    print(f"soak {mode}: {ROUNDS} migrations, median {sorted(seconds)[len(seconds) // 2]:.2f} s; "
          f"first {json.dumps(gauges.rows[0])}; last {json.dumps(gauges.rows[-1])}")
    gauges.assert_flat()
