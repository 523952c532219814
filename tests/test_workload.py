"""The sample workload's memory check: for a workload that keeps writing, the checksum its memory
must have at any beat is computed by replaying its writes, so a test can tell a migration that
lost or left stale a single page from one that moved everything."""

from __future__ import annotations

from collections.abc import Callable

from conftest import needs_root

from pycriu.workload import Workload, memory_digest


def test_the_replay_starts_from_the_pattern_and_changes_with_every_beat() -> None:
    untouched = memory_digest(4, 1, 0.0, 0.01, 500)
    assert memory_digest(4, 1, 0.5, 0.01, 0) == untouched
    digests = {memory_digest(4, 1, 0.5, 0.01, beat) for beat in range(6)}
    assert len(digests) == 6


@needs_root
def test_a_writing_workload_reports_the_replayed_checksum(workload: Callable[..., Workload]) -> None:
    w = workload(mib=4, touch=0.5)
    first = w.check_memory()
    w.wait_beats(10)
    second = w.check_memory()
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0] != second[0] != w.expected_checksum  # it did write, and between the two checks
