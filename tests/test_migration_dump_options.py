"""``Migration(dump_options=...)``: the options of the source's dump alone (a ghost file's size
limit, irmap paths, in-flight TCP data...) reach CRIU's dump, and nothing that would change what
the dump leaves, where the pages go or what the restore needs can come in that way."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from pycriu import InvalidOptionError, Migration, MigrationError
from pycriu.migration.migration import DUMP_ONLY_CRIU_KEYS, DUMP_ONLY_OPTIONS
from pycriu.migration.procs import descendants, kill_tree, tree_state, wait_gone


@pytest.mark.parametrize(("options", "why"), [
    ({"leave_running": True}, "the migration's flow sets it"),
    ({"page_server": None}, "the migration's flow sets it"),
    ({"track_mem": True}, "the migration's flow sets it"),
    ({"tcp_established": True}, "pass it in flags="),
    ({"root": "/srv/c1"}, "pass container=ContainerOptions"),
    ({"ext_mounts": ()}, "pass container=ContainerOptions"),
    ({"no_such_field": 1}, "DumpOptions has no such field"),
    ({"criu_options": {"leave-running": True}}, "not accepted in a migration"),
    ({"criu_options": {"page-server": True}}, "not accepted in a migration"),
])
def test_what_a_flow_flags_or_a_container_own_is_refused(options: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidOptionError, match=why) as info:
        Migration(1, dump_options=options)
    assert "dump_options" in info.value.message


def test_values_are_checked_as_the_dump_checks_them() -> None:
    with pytest.raises(InvalidOptionError, match="ghost_limit"):
        Migration(1, dump_options={"ghost_limit": "lots"})
    m = Migration(1, dump_options={"ghost_limit": 8 << 20, "criu_options": {"no-ghost-fiemap": True}})
    assert m.dump_extra == {"ghost_limit": 8 << 20, "criu_options": {"no-ghost-fiemap": True}}


def test_the_accepted_names_are_options_of_the_dump_alone() -> None:
    assert {"ghost_limit", "irmap_paths", "force_irmap", "tcp_skip_in_flight", "criu_options"} <= DUMP_ONLY_OPTIONS
    assert not {"leave_running", "leave_stopped", "page_server", "lazy_pages", "track_mem", "parent_images",
                "images_dir", "tcp_established", "root", "ext_mounts"} & DUMP_ONLY_OPTIONS
    assert not {"leave-running", "leave-stopped", "page-server", "lazy-pages", "track-mem", "prev-images-dir",
                "tcp-established", "root", "external"} & DUMP_ONLY_CRIU_KEYS


@pytest.fixture
def ghost_holder(tmp_path: Path) -> Iterator[list[int]]:
    """A process (alone in its PID namespace and session) that holds a deleted 2 MiB file open:
    larger than CRIU's default ghost-file limit of 1 MiB. Yields ``[pid]``; a test appends the
    pids of its migrated copies, and every one is killed at the end."""
    ready = tmp_path / "ready"
    ghost = tmp_path / "ghost"
    code = (f"import os, time, pathlib\nf = open({str(ghost)!r}, 'wb')\nf.write(b'g' * (2 << 20))\nf.flush()\n"
            f"os.unlink({str(ghost)!r})\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(3600)\n")
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", code],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert unshare.poll() is None and time.monotonic() < deadline, "the program did not get ready"
        time.sleep(0.01)
    copies = [descendants(unshare.pid)[1]]
    yield copies
    for p in copies:
        kill_tree(p)
        wait_gone(p)
    unshare.kill()
    unshare.wait()


def _ghost_size(pid: int) -> int | None:
    """The size of the deleted file ``pid`` holds open (None: it holds none)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).endswith("ghost (deleted)"):
            return fd.stat().st_size
    return None


@needs_root
def test_a_ghost_limit_lets_a_larger_deleted_file_migrate(ghost_holder: list[int], private_tmp: Path) -> None:
    pid = ghost_holder[0]
    with pytest.raises(MigrationError) as info:  # CRIU's default limit: 1 MiB
        Migration(pid, to="local", mode="classic").run()
    report = info.value.report
    assert "increase limit" in (report.error or "") or "increase limit" in str(info.value), report.error
    assert report.outcome == "rolled-back"
    assert tree_state(pid) == "running"

    report = Migration(pid, to="local", mode="classic", dump_options={"ghost_limit": 4 << 20}).run()
    assert report.outcome == "migrated", report.error
    assert report.destination_pid is not None
    ghost_holder.append(report.destination_pid)
    assert wait_gone(pid)
    assert _ghost_size(report.destination_pid) == 2 << 20  # the file's 2 MiB came along
