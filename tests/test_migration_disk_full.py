"""The destination runs out of room: the agent's root is a 4 MiB tmpfs and the images are bigger.
The migration rolls back (the source runs on, memory intact) with a typed error that names the
directory and the space, and the agent's session directory is gone."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from migration_support import TcpAgent

from pycriu.migration import Migration, MigrationError, NoSpaceError
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

SECRET = b"disk-full-secret-0123456789abcde"


@pytest.fixture
def small_agent(tmp_path: Path) -> Iterator[TcpAgent]:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "pycriu-test-small", str(root)], check=True)
    (tmp_path / "secret").write_bytes(SECRET)
    agent = TcpAgent(root / "agent", "--secret-file", str(tmp_path / "secret"), "--images-on-disk")
    try:
        yield agent
    finally:
        agent.close()
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.parametrize("mode", ["classic", "page-server"])
def test_a_full_destination_rolls_back_and_names_the_space(
        workload: Callable[..., Workload], private_tmp: Path, small_agent: TcpAgent, mode: str) -> None:
    w = workload(mib=16)
    with pytest.raises(MigrationError) as info:
        Migration(w.pid, to=small_agent.url, mode=mode, secret=SECRET, log_dir=private_tmp.parent / "logs").run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    text = f"{info.value} {info.value.__cause__}"
    if mode == "classic":  # pycriu's own check, before a byte is written
        assert isinstance(info.value.__cause__, NoSpaceError), repr(info.value.__cause__)
        assert "not enough free space" in text and str(small_agent.root) in text and "bytes needed" in text, text
    else:  # CRIU's page server writes the pages itself and hits the end of the filesystem; the
        # source's CRIU only sees its connection reset, the report says why from the agent's log
        assert isinstance(info.value, NoSpaceError), repr(info.value)
        assert "the destination's page server" in text and "No space left on device" in text, text
    w.wait_beats(3)
    assert w.checksum() == w.expected_checksum
    assert not [p for p in small_agent.root.iterdir() if p.name.startswith("s-") and
                not (p / "work").is_dir()], "a session directory was left with more than its logs"
