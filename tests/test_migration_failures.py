"""Nothing is lost: whatever breaks before the destination took over (agent killed, link cut,
restore failing, timeout, Ctrl-C), the source runs again with its memory intact, the destination
keeps no copy, and the report says so. Whatever breaks once the commit was sent, the source never
resumes: at no time do two copies run. When a lazy flow's page link breaks after the destination
resumed, the destination's copy is killed (its missing pages would read as zeros) and the source,
which CRIU kept stopped, resumes from the checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root
from migration_support import Relay, TcpAgent, agent_pids, wait_gone

from pycriu import Migration, MigrationError, PageServerAddress
from pycriu.migration import MigrationReport, Progress
from pycriu.migration.client import AgentClient
from pycriu.migration.errors import TransportError
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]


SECRET = b"0123456789abcdef-test-secret"


def _source_intact(w: Workload, report: MigrationReport) -> None:
    """The source tree runs again, beats, and its memory is what it was: resumed, or (one host,
    a dump that ended it) restored from its own images under a new pid, which the report gives."""
    assert report.source_state == "running", report
    assert report.source_pid is not None
    if report.source_pid != w.pid:
        assert report.rollback.startswith("restored from the source's own images"), report.rollback
        w.adopt(report.source_pid)
    assert w.alive(w.pid)
    w.wait_beats(3)
    assert w.checksum(w.pid) == w.expected_checksum


def _at(phase: str, event: str, action: Callable[[], None]) -> Callable[[Progress], None]:
    def progress(e: Progress) -> None:
        if e.phase == phase and e.event == event:
            action()

    return progress


def _kill_agent() -> None:
    pids = agent_pids()
    assert pids, "no agent process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("mode", "phase"), [("classic", "image transfer"), ("page-server", "restore")])
def test_agent_killed_before_restore_rolls_back(workload: Callable[..., Workload], private_tmp: Path,
                                                mode: str, phase: str) -> None:
    w = workload(mib=16)
    with pytest.raises(MigrationError, match="rolled-back") as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs",
                  progress=_at(phase, "start", _kill_agent)).run()
    report = info.value.report
    assert report is not None
    assert report.outcome == "rolled-back"
    assert report.destination_pid is None
    assert report.downtime is None
    assert "agent" in (report.error or "")
    _source_intact(w, report)


def test_connection_cut_before_restore_rolls_back(workload: Callable[..., Workload], private_tmp: Path) -> None:
    agent = TcpAgent(private_tmp.parent / "agent-root", "--secret-file", _secret_file(private_tmp))
    relay = Relay(("127.0.0.1", agent.port))
    try:
        w = workload(mib=16)
        with pytest.raises(MigrationError) as info:
            Migration(w.pid, to=f"tcp://127.0.0.1:{relay.port}", mode="classic", secret=SECRET,
                      log_dir=private_tmp.parent / "logs", progress=_at("restore", "start", relay.cut)).run()
        report = info.value.report
        assert report.outcome == "rolled-back"
        _source_intact(w, report)
        # the agent noticed and cleaned its session up (it keeps only a failed session's logs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list(agent.root.glob("s-*/images")):
            time.sleep(0.05)
        assert not list(agent.root.glob("s-*/images"))
    finally:
        relay.close()
        agent.close()


def test_unresponsive_agent_times_out_and_rolls_back(workload: Callable[..., Workload], private_tmp: Path) -> None:
    agent = TcpAgent(private_tmp.parent / "agent-root", "--secret-file", _secret_file(private_tmp),
                     "--commit-timeout", "5")
    try:
        w = workload(mib=16)
        t0 = time.monotonic()
        with pytest.raises(MigrationError) as info:
            Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, timeout=3,
                      log_dir=private_tmp.parent / "logs",
                      progress=_at("restore", "start", lambda: os.kill(agent.proc.pid, signal.SIGSTOP))).run()
        assert time.monotonic() - t0 < 30
        report = info.value.report
        assert "timed out" in (report.error or "")
        assert report.outcome == "rolled-back"
        _source_intact(w, report)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
        agent.close()
    # the agent woke up, restored (maybe), saw nobody commit, and killed its copy: one copy runs
    time.sleep(0.5)
    assert w.alive(w.pid)


def test_ctrl_c_during_the_transfer_resumes_the_source(workload: Callable[..., Workload], private_tmp: Path) -> None:
    w = workload(mib=16)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="classic", log_dir=private_tmp.parent / "logs",
                  progress=_at("image transfer", "start", interrupt)).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back"
    _source_intact(w, report)


@needs_lazy_pages
@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_while_a_lazy_dump_sends_its_images_resumes_the_source(workload: Callable[..., Workload],
                                                                      private_tmp: Path) -> None:
    """The lazy dump runs in a thread; Ctrl-C reaches the main thread while the dump thread is in
    CRIU's post-dump sending the images: post-dump is made to fail, CRIU resumes the tree."""
    w = workload(mib=16)
    main = threading.main_thread().ident
    assert main is not None

    def interrupt_main() -> None:
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.2)  # let the main thread take it while the images are being sent

    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="lazy", log_dir=private_tmp.parent / "logs",
                  progress=_at("image transfer", "start", interrupt_main)).run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.outcome == "rolled-back", report
    _source_intact(w, report)


def _secret_file(tmp: Path) -> str:
    p = tmp.parent / "secret"
    p.write_bytes(SECRET)
    p.chmod(0o600)
    return str(p)


# --- lazy flows --------------------------------------------------------------------------------


@needs_lazy_pages
@pytest.mark.parametrize("mode", ["lazy", "page-server-on-source"])
def test_lazy_restore_failure_resumes_the_frozen_source(workload: Callable[..., Workload], private_tmp: Path,
                                                        mode: str) -> None:
    """The destination cannot reach the source's page server: its restore fails, and CRIU, which
    waits for a lazy-pages client, is told to give up so that the source resumes."""
    w = workload(mib=16)
    with socket_closed_port() as dead:
        with pytest.raises(MigrationError) as info:
            Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs", timeout=30,
                      relay=lambda a: PageServerAddress("127.0.0.1", dead)).run()
    report = info.value.report
    assert report.outcome == "rolled-back", report
    assert report.destination_state in ("none", "killed")
    _source_intact(w, report)


class socket_closed_port:
    """A TCP port nobody listens on (bound but not listening, so nobody else takes it)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@needs_lazy_pages
@pytest.mark.parametrize(("mode", "reset"), [("lazy", True), ("lazy", False), ("page-server-on-source", True)])
def test_page_link_broken_after_resume_kills_the_destination_and_resumes_the_source(
        workload: Callable[..., Workload], private_tmp: Path, mode: str, reset: bool) -> None:
    """The destination resumed and pulls pages through a slow link that then breaks (a connection
    reset, or an orderly close that CRIU's page server takes for the end of the transfer). The
    destination's copy is incomplete: the agent kills it. The source was kept stopped (not
    killed): it resumes from the checkpoint, memory intact. What the destination did since the
    freeze is lost, and the report says so."""
    w = workload(mib=24)
    relays: list[Relay] = []

    def relay(address: PageServerAddress) -> PageServerAddress:
        r = Relay((address.address, address.port), rate=8 << 20)
        relays.append(r)
        return PageServerAddress("127.0.0.1", r.port)

    def cut_midway() -> None:
        def run() -> None:
            r = relays[0]
            deadline = time.monotonic() + 20
            while r.forwarded < 4 << 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            r.cut(reset=reset)

        threading.Thread(target=run, daemon=True).start()

    try:
        with pytest.raises(MigrationError, match="after the destination resumed|page transfer failed") as info:
            Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs", relay=relay,
                      progress=_at("lazy page completion", "start", cut_midway)).run()
    finally:
        for r in relays:
            r.close()
    report = info.value.report
    assert report.outcome == "failed-after-resume", report
    assert report.destination_pid is not None and report.downtime is not None
    assert report.destination_state.startswith("killed")
    w.adopt(report.destination_pid)
    assert wait_gone(report.destination_pid), "the incomplete destination copy still runs"
    w.pid = report.pid  # back to the source
    assert report.source_state == "running", report
    _source_intact(w, report)


# --- the commit: exactly one copy runs ---------------------------------------------------------


def _running_copies(w: Workload) -> list[int]:
    """Processes of any copy of the workload (found by its state path) that run: neither stopped
    (T/t: CRIU's leave_stopped, ptrace) nor zombies."""
    needle = str(w.state_path).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        args = cmd.split(b"\0")
        if needle in args and b"pycriu.workload" in args and not args[0].endswith(b"unshare") \
                and state not in ("T", "t", "Z", "X"):
            found.append(int(entry))
    return found


def _wait_files_closed(pid: int, timeout: float = 10.0) -> bool:
    """Wait until every thread of ``pid`` exited (a zombie leader alone does not mean that its
    files, shared with threads still exiting, are closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if tasks == [str(pid)] and state in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
def test_agent_killed_after_restore_before_commit_leaves_one_copy(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The agent dies after it restored the tree and before the commit: its tree was never
    resumed (stopped); the agent's guard kills it (or the source does: same host), and the source
    resumes its own."""
    w = workload(mib=16)
    original = AgentClient.commit

    def commit(self: AgentClient) -> dict[str, object]:
        pids = agent_pids()
        assert pids, "no agent process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:  # every thread gone and the pipe closed, not merely the leader a zombie
            assert _wait_files_closed(pid)
        return original(self)

    monkeypatch.setattr(AgentClient, "commit", commit)
    with pytest.raises(MigrationError) as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    report = info.value.report
    assert report is not None
    assert report.destination_pid is not None
    w.adopt(report.destination_pid)  # cleaned up whatever happens
    w.pid = report.pid
    assert report.outcome == "rolled-back", report
    assert report.destination_state in ("killed", "gone"), report
    assert report.destination_pid == report.source_pid or wait_gone(report.destination_pid)
    assert _running_copies(w) == [report.source_pid]
    _source_intact(w, report)


def test_a_remote_agent_killed_before_the_commit_takes_its_restored_tree_with_it(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over ``tcp://`` the source cannot touch the destination's processes: when the agent dies
    (SIGKILL, no clean-up) between the restore and the commit, its guard kills the stopped tree
    it restored, so no unowned copy is left on the destination."""
    agent = TcpAgent(private_tmp.parent / "agent-root", "--secret-file", _secret_file(private_tmp))
    w = workload(mib=16)
    original = AgentClient.commit

    def commit(self: AgentClient) -> dict[str, object]:
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait()
        return original(self)

    monkeypatch.setattr(AgentClient, "commit", commit)
    try:
        with pytest.raises(MigrationError) as info:
            Migration(w.pid, to=agent.url, mode="classic", secret=SECRET, log_dir=private_tmp.parent / "logs").run()
        report = info.value.report
        assert report is not None and report.destination_pid is not None
        w.adopt(report.destination_pid)  # cleaned up whatever happens
        w.pid = report.pid
        assert report.outcome == "rolled-back", (report.error, report.notes)
        assert wait_gone(report.destination_pid), "the guard did not kill the uncommitted tree"
        assert _running_copies(w) == [report.pid]
        _source_intact(w, report)
        logs = list(agent.root.glob("s-*/work/guard.log"))
        assert len(logs) == 1
        assert f"killed its restored tree {report.destination_pid}" in logs[0].read_text()
    finally:
        agent.close()


@pytest.mark.parametrize("mode", ["classic", "page-server", pytest.param("lazy", marks=needs_lazy_pages),
                                  pytest.param("page-server-on-source", marks=needs_lazy_pages)])
def test_interrupt_right_after_the_commit_ack_leaves_the_destination(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Ctrl-C right after the agent acknowledged the commit: the destination owns the process,
    the source is killed, not resumed."""
    w = workload(mib=16)
    original = AgentClient.commit

    def commit(self: AgentClient) -> dict[str, object]:
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(AgentClient, "commit", commit)
    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode=mode, log_dir=private_tmp.parent / "logs").run()
    report = info.value.report  # type: ignore[attr-defined]
    assert report.destination_pid is not None
    source = w.pid
    w.adopt(report.destination_pid)
    assert report.outcome == "migrated", report
    assert report.source_state == "gone"
    assert report.destination_state == "running"
    assert wait_gone(source)
    assert _running_copies(w) == [report.destination_pid]
    w.wait_beats(3)
    assert w.checksum(report.destination_pid) == w.expected_checksum


def test_ctrl_c_while_the_destination_s_logs_are_fetched_still_settles_the_migration(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the handover, while the teardown fetches the agent's logs: the remote part
    is cut short, the local steps are not. KeyboardInterrupt comes with the whole report (the
    source's fate settled, outcome migrated), the agent is ended and its directory removed
    (``private_tmp`` checks that nothing was left)."""
    w = workload(mib=16)

    def fetch_logs(self: AgentClient, into: Path) -> list[Path]:
        raise KeyboardInterrupt

    monkeypatch.setattr(AgentClient, "fetch_logs", fetch_logs)
    with pytest.raises(KeyboardInterrupt) as info:
        Migration(w.pid, to="local", mode="classic", log_dir=private_tmp.parent / "logs").run()
    report = info.value.report  # type: ignore[attr-defined]
    source = w.pid
    assert report.outcome == "migrated", report
    assert report.source_state == "gone" and report.destination_state == "running"
    assert any("interrupted" in n and "destination's logs" in n for n in report.notes), report.notes
    assert report.total_seconds is not None and report.total_seconds > 0
    assert wait_gone(source)
    w.adopt(report.destination_pid)
    assert _running_copies(w) == [report.destination_pid]
    assert w.checksum(report.destination_pid) == w.expected_checksum


def test_commit_sent_then_link_cut_leaves_the_source_stopped(
        workload: Callable[..., Workload], private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit reaches the agent (which resumes its copy) but its acknowledgement is lost with
    the link: the source cannot know, so it stays stopped (never two running copies) and the
    report says ``unknown`` and what to do."""
    agent = TcpAgent(private_tmp.parent / "agent-root", "--secret-file", _secret_file(private_tmp))
    relay = Relay(("127.0.0.1", agent.port))
    w = workload(mib=16)

    def commit(self: AgentClient) -> dict[str, object]:
        self.channel.send({"type": "commit"})
        self.commit_sent = True
        deadline = time.monotonic() + 10
        while not _running_copies(w) and time.monotonic() < deadline:  # the agent resumed its copy
            time.sleep(0.01)
        relay.cut()
        raise TransportError("connection to the agent broke: (test) the acknowledgement was lost")

    monkeypatch.setattr(AgentClient, "commit", commit)
    try:
        with pytest.raises(MigrationError, match="unknown") as info:
            Migration(w.pid, to=f"tcp://127.0.0.1:{relay.port}", mode="classic", secret=SECRET,
                      log_dir=private_tmp.parent / "logs").run()
        report = info.value.report
        assert report.destination_pid is not None
        source = w.pid
        w.adopt(report.destination_pid)
        assert report.outcome == "unknown", report
        assert report.source_state == "stopped"
        assert any("not acknowledged" in n and "kill -CONT" in n for n in report.notes), report.notes
        time.sleep(0.5)
        assert _running_copies(w) == [report.destination_pid]
        assert w.alive(source)  # stopped, left to the operator
        w.wait_beats(3)
        assert w.checksum(report.destination_pid) == w.expected_checksum
    finally:
        relay.close()
        agent.close()
