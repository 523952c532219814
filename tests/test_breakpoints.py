"""The kernel's hardware-breakpoint path kept warm while CRIU runs (:mod:`pycriu.breakpoints`).

CRIU stops the tasks it dumped or restored at hardware breakpoints; the first one after the
kernel's perf hooks went cold waits 5 to 20 ms for them, with the tree frozen. pycriu holds a
disabled dummy perf event on each host while CRIU works, so the hooks stay on. What the tests
show is that the event is held exactly then, on both hosts of a migration, and let go after; the
milliseconds it saves are measured by the benchmark (docs/benchmarks.rst), not here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root

import pycriu
from pycriu import NotifyAction, breakpoints
from pycriu.migration import Migration, Progress
from pycriu.workload import Workload

WorkloadFactory = Callable[..., Workload]


def perf_events(pid: int | str = "self") -> int:
    """How many perf event descriptors process ``pid`` holds."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:[perf_event]"
        except OSError:
            pass  # closed meanwhile
    return count


def agents() -> list[int]:
    """The local migration agents running as this process's children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"pycriu.migration.agent" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def warm_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PYCRIU_WARM_BREAKPOINTS", raising=False)
    if breakpoints._refused is not None:  # noqa: SLF001 - the module's own memory of a refusal
        pytest.skip(f"this kernel refuses a dummy perf event (errno {breakpoints._refused}): nothing to keep warm")
    yield
    assert not breakpoints.held(), "a test left the event held"


def test_holders_share_one_event_and_the_last_one_closes_it(warm_allowed: None) -> None:
    before = perf_events()
    first = breakpoints.Warm().open()
    if not breakpoints.held():
        pytest.skip(f"this kernel refuses a dummy perf event (errno {breakpoints._refused})")  # noqa: SLF001
    with breakpoints.Warm():
        assert perf_events() == before + 1  # one event, however many hold it
    assert breakpoints.held()  # the first holder still holds it
    first.close()
    first.close()  # closing twice lets go once
    assert not breakpoints.held()
    assert perf_events() == before


def test_a_background_open_holds_the_event_once_it_is_waited_for(warm_allowed: None) -> None:
    warm = breakpoints.Warm().open_in_background()
    warm.open()  # already opening: not a second hold
    warm.close()  # waits for the background open, then lets go
    assert not breakpoints.held()


def test_switched_off_in_the_environment_nothing_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCRIU_WARM_BREAKPOINTS", "off")
    with breakpoints.Warm():
        assert not breakpoints.held()
    assert not breakpoints.enabled()


@needs_root
@pytest.mark.parametrize("operation", ["dump", "restore"])
def test_criu_holds_the_event_while_it_works_and_lets_go_after(
        operation: str, warm_allowed: None, criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    w = workload(mib=4)
    seen: dict[str, int] = {}

    def notify(action: str, pid: int) -> None:
        seen[action] = perf_events()

    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, notify=notify if operation == "dump" else None))
    if operation == "restore":
        restored = criu.restore(pycriu.RestoreOptions(images_dir=images_dir, notify=notify))
        w.adopt(restored.pid)
        w.wait_beats(2)
        assert seen[NotifyAction.PRE_RESUME] == 1  # CRIU's breakpoints catch the tasks before this
    else:
        assert seen[NotifyAction.POST_DUMP] == 1  # the tasks were cured (breakpoints) before this
    assert perf_events() == 0


@needs_root
def test_criu_runs_as_before_where_it_is_switched_off(
        monkeypatch: pytest.MonkeyPatch, criu: pycriu.Criu, workload: WorkloadFactory, images_dir: Path) -> None:
    monkeypatch.setenv("PYCRIU_WARM_BREAKPOINTS", "off")
    w = workload(mib=4)
    seen: list[int] = []
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images_dir, leave_running=True,
                                 notify=lambda action, pid: seen.append(perf_events())))
    assert seen and set(seen) == {0}
    w.wait_beats(2)


@needs_root
@needs_lazy_pages
def test_a_migration_holds_it_on_both_hosts_from_before_the_freeze(
        warm_allowed: None, workload: WorkloadFactory) -> None:
    w = workload(mib=8)
    held: dict[str, tuple[int, list[int]]] = {}

    def progress(p: Progress) -> None:
        if p.event == "start" and p.phase in ("freeze+dump", "restore"):
            held[p.phase] = (perf_events(), [perf_events(a) for a in agents()])

    report = Migration(w.pid, to="local", mode="lazy", progress=progress).run()
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)
    w.wait_beats(3)
    assert held["freeze+dump"][0] == 1  # opened beside the checks, waited for before the freeze
    assert held["restore"][1] == [1]  # the agent's session holds its own (opened after hello)
    assert perf_events() == 0
