"""Iterative pre-copy and hybrid migration: the convergence policy (unit tests, no root), the fast
refusal on a kernel without dirty-memory tracking (before the process is touched), and the
end-to-end flows, which need that tracking and skip here with the kernel's reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FEATURES, needs_lazy_pages, needs_mem_track, needs_root
from hypothesis import given
from hypothesis import strategies as st
from migration_support import TcpAgent, assert_moved

import pycriu
from pycriu import Migration, PreCopyPolicy
from pycriu.migration.modes import choose_mode
from pycriu.workload import Workload

SECRET = b"pre-copy-test-secret-0123456789"
NO_MEM_TRACK = "kernel has no dirty-memory tracking (CONFIG_MEM_SOFT_DIRTY not set): pre-dump unavailable"

# --- the policy ---------------------------------------------------------------------------------


def test_defaults_are_p_hauls() -> None:
    p = PreCopyPolicy()
    assert (p.max_iterations, p.min_pages, p.max_growth) == (8, 64, 0.10)


def test_a_small_iteration_converges() -> None:
    d = PreCopyPolicy().decide([65536, 40])
    assert not d.another and d.reason.startswith("converged")


def test_a_shrinking_dirty_set_goes_on() -> None:
    d = PreCopyPolicy().decide([65536, 8000])
    assert d.another


def test_a_growing_dirty_set_stops() -> None:
    d = PreCopyPolicy().decide([65536, 8000, 9000])  # +12.5 % > 10 %
    assert not d.another and d.reason.startswith("not converging") and "+12%" in d.reason


def test_growth_within_the_tolerance_goes_on() -> None:
    assert PreCopyPolicy().decide([65536, 8000, 8500]).another  # +6 %


def test_max_iterations_stops() -> None:
    d = PreCopyPolicy(max_iterations=3).decide([9000, 8000, 7000])
    assert not d.another and "max_iterations=3" in d.reason


def test_min_iterations_forces_more() -> None:
    assert PreCopyPolicy(min_iterations=2).decide([10]).another
    assert not PreCopyPolicy(min_iterations=2).decide([10, 10]).another


@pytest.mark.parametrize("kwargs", [{"max_iterations": 0}, {"min_pages": -1}, {"max_growth": -0.1},
                                    {"max_iterations": 2, "min_iterations": 3}, {"max_growth": True},
                                    {"max_iterations": 1.5}])
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(pycriu.InvalidOptionError):
        PreCopyPolicy(**kwargs)  # type: ignore[arg-type]


@given(st.integers(1, 12), st.integers(0, 1000), st.floats(0, 2), st.lists(st.integers(0, 10**6), min_size=1,
                                                                            max_size=40))
def test_the_policy_always_stops_in_time(max_iterations: int, min_pages: int, growth: float,
                                         written: list[int]) -> None:
    policy = PreCopyPolicy(max_iterations=max_iterations, min_pages=min_pages, max_growth=growth)
    history: list[int] = []
    for pages in written:
        history.append(pages)
        decision = policy.decide(history)
        if not decision.another:
            break
        # going on means: not small enough yet, not growing too fast, iterations left
        assert pages > min_pages
        assert len(history) < max_iterations
    assert len(history) <= max_iterations


def test_a_process_with_a_steady_dirty_rate_converges() -> None:
    """Each pre-dump copies what was dirtied during the previous one; with the copy faster than
    the dirtying, the iterations shrink geometrically until one is small enough."""
    policy = PreCopyPolicy()
    total, copy_rate, dirty_rate = 262144, 150000.0, 20000.0  # pages, pages/s
    history = [total]
    while policy.decide(history).another:
        history.append(int(history[-1] / copy_rate * dirty_rate))
    assert history[-1] <= policy.min_pages
    assert len(history) <= policy.max_iterations


# --- the flows ----------------------------------------------------------------------------------


@needs_root
@pytest.mark.skipif(FEATURES is not None and FEATURES.mem_track, reason="this kernel has dirty-memory tracking")
@pytest.mark.parametrize("mode", ["pre-copy", "hybrid"])
def test_without_memory_tracking_it_fails_fast_before_touching_the_process(
        workload: Callable[..., Workload], private_tmp: Path, mode: str) -> None:
    w = workload(mib=8)
    logs = private_tmp.parent / "logs"
    with pytest.raises(pycriu.KernelUnsupportedError, match="dirty-memory tracking") as info:
        Migration(w.pid, to="local", mode=mode, log_dir=logs).run()
    assert NO_MEM_TRACK in str(info.value)
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "refused"
    assert not list(logs.rglob("*.log")), "CRIU ran or an agent was started"
    assert w.alive(w.pid)
    w.wait_beats(3)


#: The workload of the end-to-end tests: it keeps writing (``touch``: 5 % of its memory a second),
#: so every pre-copy round has pages to copy again; small enough for software emulation (the test
#: VM), where one round of 32 MiB takes about a second.
MIB, TOUCH = 32, 0.05
PAGES = MIB * 256


def assert_pre_copied(report: pycriu.MigrationReport) -> None:
    """The rounds ran and each later one copied only what changed since the one before."""
    rounds = report.pre_copy
    assert len(rounds) >= 2 and report.pre_copy_stop, report.pre_copy_stop
    assert rounds[0]["pages_written"] >= PAGES
    assert all(r["pages_written"] < PAGES // 2 for r in rounds[1:]), rounds
    assert report.pages["pre_copied"] == sum(r["pages_written"] for r in rounds)


@needs_root
@needs_mem_track
def test_pre_copy_moves_a_writing_workload_and_freezes_it_only_for_what_changed(
        workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=MIB, touch=TOUCH)
    report = Migration(w.pid, to="local", mode="pre-copy", log_dir=private_tmp.parent / "logs").run()
    assert_moved(w, report)  # with every write the workload made, up to the freeze and after
    assert_pre_copied(report)
    # the frozen dump sent what changed since the last round, not the whole memory
    assert 0 < report.pages["via_page_server"] < PAGES // 2, report.pages
    assert report.pages["lazy"] == 0


@needs_root
@needs_mem_track
@needs_lazy_pages
def test_hybrid_moves_a_writing_workload_and_only_what_changed_faults_in(
        workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=MIB, touch=TOUCH)
    report = Migration(w.pid, to="local", mode="hybrid", log_dir=private_tmp.parent / "logs").run()
    assert_moved(w, report)
    assert_pre_copied(report)
    # the lazy final dump leaves out what the destination holds from the rounds: only the pages
    # written since the last one are served after the resume (all of them were, before the
    # source kept its rounds' pagemaps)
    assert 0 < report.pages["lazy"] < PAGES // 2, report.pages


@needs_root
@needs_mem_track
@pytest.mark.parametrize("mode", ["pre-copy", pytest.param("hybrid", marks=needs_lazy_pages)])
def test_over_tcp_every_round_goes_through_criu_tls(workload: Callable[..., Workload], private_tmp: Path,
                                                   tmp_path: Path, mode: str) -> None:
    """Across hosts (a ``tcp://`` agent with a shared secret) each round's page connection is
    CRIU's own TLS, and the rounds chain on the destination as they do locally."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    agent = TcpAgent(tmp_path / "agent", "--secret-file", str(secret))
    try:
        w = workload(mib=MIB, touch=TOUCH)
        report = Migration(w.pid, to=agent.url, mode=mode, secret=SECRET, log_dir=private_tmp.parent / "logs",
                           policy=PreCopyPolicy(max_iterations=3)).run()
        assert_moved(w, report)
        assert 2 <= len(report.pre_copy) <= 3
        for i in range(1, len(report.pre_copy) + 1):
            for label in (f"source pre-dump-{i}", f"destination page-server-pre-{i}"):
                assert "TLS handshake completed" in Path(report.logs[label]).read_text(), label
    finally:
        agent.close()


@needs_root
@needs_mem_track
def test_a_policy_of_one_round_is_honoured(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=8)
    report = Migration(w.pid, to="local", mode="pre-copy", policy=PreCopyPolicy(max_iterations=1),
                       log_dir=private_tmp.parent / "logs").run()
    assert_moved(w, report)
    assert len(report.pre_copy) == 1 and "max_iterations=1" in (report.pre_copy_stop or "")


# --- auto -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst", "mode"), [
    ((True, True), (True, True), "lazy"),          # lazy pages on both: post-copy
    ((False, True), (True, True), "pre-copy"),     # no lazy pages on the source, tracking on both
    ((True, True), (False, True), "pre-copy"),     # ... or on the destination
    ((False, True), (True, False), "page-server"),  # neither on both
    ((False, False), (False, False), "page-server"),
])
def test_auto_picks_pre_copy_where_lazy_pages_are_missing_but_memory_is_tracked(
        src: tuple[bool, bool], dst: tuple[bool, bool], mode: str) -> None:
    chosen, reason = choose_mode("auto", *src, *dst)
    assert chosen == mode
    assert reason.startswith("auto: ")
    if mode == "pre-copy":
        assert "track dirty memory" in reason
