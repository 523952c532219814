"""Progress of the pages CRIU moves itself: pycriu reads how far CRIU's page connection has got
from the kernel (sock_diag's TCP info) and reports it as the phase's ``bytes`` progress, with
the total where the images say it (the lazy pages). The page link is throttled by a relay so
that the transfer lasts long enough to be seen."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import Relay

from pycriu import Migration, PageServerAddress
from pycriu.migration import Progress
from pycriu.workload import Workload

pytestmark = needs_root

MiB = 1 << 20


@pytest.fixture
def slow_pages() -> Iterator[Callable[[PageServerAddress], PageServerAddress]]:
    """A ``relay=`` that sends every CRIU page connection through a relay at 8 MiB/s, both ways."""
    relays: list[Relay] = []

    def relay(address: PageServerAddress) -> PageServerAddress:
        r = Relay((address.address, address.port), rate=8 * MiB, upstream_rate=8 * MiB)
        relays.append(r)
        return PageServerAddress("127.0.0.1", r.port)

    yield relay
    for r in relays:
        r.close()


def _bytes(events: list[Progress], phase: str) -> list[Progress]:
    return [e for e in events if e.phase == phase and e.event == "bytes"]


def test_a_dump_into_the_page_server_reports_the_pages_as_they_go(
        workload: Callable[..., Workload], private_tmp: Path,
        slow_pages: Callable[[PageServerAddress], PageServerAddress]) -> None:
    w = workload(mib=16)
    events: list[Progress] = []
    report = Migration(w.pid, to="local", mode="page-server", relay=slow_pages, progress=events.append).run()
    assert report.outcome == "migrated", report.error
    seen = _bytes(events, "freeze+dump")
    assert len(seen) >= 2, [(e.phase, e.event) for e in events]
    done = [e.done for e in seen]
    assert done == sorted(done) and done[-1] is not None and done[-1] >= 8 * MiB, done
    assert all(e.total is None for e in seen)  # CRIU does not say beforehand how much it will send
    w.adopt(report.destination_pid)
    assert w.checksum(report.destination_pid) == w.expected_checksum


@needs_lazy_pages
@pytest.mark.parametrize("mode", ["lazy", "page-server-on-source"])
def test_a_lazy_transfer_reports_its_pages_of_the_lazy_total(
        workload: Callable[..., Workload], private_tmp: Path,
        slow_pages: Callable[[PageServerAddress], PageServerAddress], mode: str) -> None:
    w = workload(mib=16)
    events: list[Progress] = []
    report = Migration(w.pid, to="local", mode=mode, relay=slow_pages, progress=events.append).run()
    assert report.outcome == "migrated", report.error
    seen = _bytes(events, "lazy page completion")
    assert len(seen) >= 2, [(e.phase, e.event) for e in events]
    total = seen[0].total
    assert total is not None and 16 * MiB <= total <= 64 * MiB  # the workload's memory (and libc's), lazily
    done = [e.done for e in seen]
    assert done == sorted(done) and all(d is not None and d <= total for d in done), done
    assert done[-1] is not None and done[-1] >= total // 2, (done, total)
    w.adopt(report.destination_pid)
    assert w.checksum(report.destination_pid) == w.expected_checksum


def test_without_a_progress_callback_nothing_samples(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampling costs a netlink dump every half second: only when someone displays it."""
    from pycriu.migration import procs

    calls: list[int] = []
    original = procs.tcp_bytes_acked

    def counted(**kw: int | None) -> int | None:
        calls.append(1)
        return original(**kw)

    monkeypatch.setattr(procs, "tcp_bytes_acked", counted)
    w = workload(mib=4)
    report = Migration(w.pid, to="local", mode="page-server").run()
    if report.destination_pid is not None:
        w.adopt(report.destination_pid)  # the restored copy is killed with the workload
    assert report.outcome == "migrated", report.error
    assert calls == []
