"""Several migrations at the same time: different workloads, to one agent and to two, lazy and
classic mixed, each in its own thread. All succeed, each process lands where its own migration
says (its heartbeat and checksum answer at the pid its report names: no crossed sessions), and
each agent ran one session per migration."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import TcpAgent, assert_moved

from pycriu.migration import Migration, MigrationReport
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu, needs_lazy_pages]

SECRET = b"concurrent-secret-0123456789abcd"


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[TcpAgent]]:
    (tmp_path / "secret").write_bytes(SECRET)
    made = [TcpAgent(tmp_path / f"agent-{i}", "--secret-file", str(tmp_path / "secret")) for i in range(2)]
    yield made
    for a in made:
        a.close()


def test_migrations_at_the_same_time_to_one_and_to_two_agents(
        workload: Callable[..., Workload], private_tmp: Path, agents: list[TcpAgent]) -> None:
    a, b = agents
    plan = [(a, "lazy"), (a, "classic"), (b, "classic"), (b, "lazy"), (None, "lazy")]  # None: a local agent
    ws = [workload(mib=8, threads=1) for _ in plan]
    reports: dict[int, MigrationReport] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(plan))

    def migrate(i: int, agent: TcpAgent | None, mode: str) -> None:
        try:
            start.wait()
            to = agent.url if agent is not None else "local"
            reports[i] = Migration(ws[i].pid, to=to, mode=mode, secret=SECRET if agent else None,
                                   log_dir=private_tmp.parent / f"logs-{i}").run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(i, agent, mode)) for i, (agent, mode) in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    pids = [reports[i].destination_pid for i in range(len(plan))]
    assert len(set(pids)) == len(plan), pids
    for i, w in enumerate(ws):
        assert reports[i].mode == plan[i][1]
        assert_moved(w, reports[i])  # adopts the pid its own report names, checks heartbeat and memory
    for agent, count in ((a, 2), (b, 2)):
        sessions = re.findall(r"(s-[0-9a-f]{8}): session for", Path(agent.log.name).read_text())
        assert len(set(sessions)) == count, sessions
