"""Helpers of the migration tests: a private temporary directory with a leak check, a recorder of
what lies in both sides' directories at restore time, a TCP relay that can throttle and cut a
link, agents over TCP, test certificates, and a real OpenSSH server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pycriu import MigrationReport
from pycriu.daemons import stop_process
from pycriu.migration import Progress
from pycriu.migration.images import memory_dir
from pycriu.workload import Workload

AGENT = [sys.executable, "-m", "pycriu.migration.agent"]


def _children_cmdlines(root: int) -> dict[int, str]:
    """Descendants of ``root`` and their command lines."""
    parents: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out = {}
    for pid in parents:
        p = pid
        while p > 1:
            p = parents.get(p, 0)
            if p == root:
                out[pid] = cmd.get(pid, "")
                break
    return out


def agent_pids() -> list[int]:
    """Agent processes this test process started (directly or not)."""
    return [p for p, c in _children_cmdlines(os.getpid()).items() if "pycriu.migration.agent" in c]


def criu_pids() -> list[int]:
    return [p for p, c in _children_cmdlines(os.getpid()).items()
            if c.split(" ")[0].endswith("criu") and ("page-server" in c or "lazy-pages" in c or "swrk" in c)]


def leak_checked_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Body of the ``private_tmp`` fixtures: point :mod:`tempfile` at a private directory, and
    check at the end that a migration left nothing behind there (scratch images, agent roots) and
    no agent or CRIU daemon running."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    shm = memory_dir()
    prefixes = ("pycriu-agent-", "pycriu-migrate-")
    in_shm = {p.name for p in shm.iterdir() if p.name.startswith(prefixes)} if shm else set()
    yield tmp
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(prefixes)]
    if shm is not None:  # the lazy flows' images live in tmpfs (RAM): never left behind either
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            new = [p.name for p in shm.iterdir() if p.name.startswith(prefixes) and p.name not in in_shm]
            if not new:
                break
            time.sleep(0.05)
        leftovers += [f"{shm}/{name}" for name in new]
    deadline = time.monotonic() + 10
    while (agent_pids() or criu_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers, f"temporary directories left behind: {leftovers}"
    assert not agent_pids(), "an agent process outlived the migration"
    assert not criu_pids(), "a CRIU daemon outlived the migration"


@dataclass
class Snapshot:
    """What the directories held (a progress callback): the source's when its images had been
    sent (``source``) and when the restore started (``source_at_restore``); the destination's
    when the restore started."""

    tmp: Path
    source: dict[str, int] = field(default_factory=dict)
    source_at_restore: dict[str, int] = field(default_factory=dict)
    source_ids: dict[str, tuple[int, int]] = field(default_factory=dict)  # (st_dev, st_ino)
    destination: dict[str, int] = field(default_factory=dict)
    destination_allocated: dict[str, int] = field(default_factory=dict)
    destination_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    events: list[Progress] = field(default_factory=list)

    in_memory: set[str] = field(default_factory=set)  # "source"/"destination": images were in tmpfs

    def __call__(self, event: Progress) -> None:
        if event.event != "bytes":
            self.events.append(event)
        if (event.phase, event.event) not in (("image transfer", "end"), ("restore", "start")):
            return
        shm = [memory_dir()] if memory_dir() is not None else []
        source = self.source if event.phase == "image transfer" else self.source_at_restore
        for root in [self.tmp, *shm]:
            for p in root.glob("pycriu-migrate-*/images/*"):
                st = p.stat()
                source[p.name] = st.st_size
                if event.phase == "image transfer":
                    self.source_ids[p.name] = (st.st_dev, st.st_ino)
                if root != self.tmp:
                    self.in_memory.add("source")
        if event.phase == "restore" and event.event == "start":
            for root in [self.tmp, *shm]:
                # the agent's session images: under its root, or in tmpfs for the lazy flows
                for p in [*root.glob("pycriu-agent-*/s-*/images/*"), *root.glob("pycriu-agent-s-*/*")]:
                    st = p.stat()
                    self.destination[p.name] = st.st_size
                    self.destination_allocated[p.name] = min(st.st_size, st.st_blocks * 512)
                    self.destination_ids[p.name] = (st.st_dev, st.st_ino)
                    if root != self.tmp:
                        self.in_memory.add("destination")

    def linked(self) -> set[str]:
        """The destination's images that are the source's own files (hard links)."""
        return {n for n, i in self.destination_ids.items() if self.source_ids.get(n) == i}

    @staticmethod
    def pages(files: dict[str, int]) -> int:
        return sum(v for k, v in files.items() if k.startswith("pages-"))

    def phases(self) -> list[str]:
        return [e.phase for e in self.events if e.event == "start"]


class Relay:
    """A TCP relay on 127.0.0.1 for one connection to ``target``: throttle it, or cut it."""

    def __init__(self, target: tuple[str, int], *, rate: float | None = None, upstream_rate: float | None = None,
                 record: bool = False) -> None:
        """``rate``: bytes/s from the target back (lazy pages); ``upstream_rate``: bytes/s to the
        target (a dump into a page server). ``record``: keep every byte that crosses, both ways
        (:attr:`sent`, :attr:`received`)."""
        self.target = target
        self.rate = rate
        self.upstream_rate = upstream_rate
        self.record = record
        self.sent = bytearray()  # from the connecting side to the target
        self.received = bytearray()  # back
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.forwarded = 0
        self.first = b""  # the first bytes the connecting side sent (what a wire tap would see)
        self.returned = 0  # bytes from the connecting side to the target
        self.connected = threading.Event()
        self._socks: list[socket.socket] = []
        self._cut = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            downstream, _ = self.server.accept()
            upstream = socket.create_connection(self.target)
        except OSError:
            return
        self._socks = [downstream, upstream]
        self.connected.set()
        threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
        self._pump(upstream, downstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        start = time.monotonic()
        try:
            while not self._cut.is_set():
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self.record:
                    (self.received if count else self.sent).extend(data)
                if not count:
                    self.first = self.first or data[:16]
                    self.returned += len(data)
                    if self.upstream_rate:
                        ahead = self.returned / self.upstream_rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)
                dst.sendall(data)
                if count:
                    self.forwarded += len(data)
                    if self.rate:
                        ahead = self.forwarded / self.rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass

    def cut(self, *, reset: bool = True) -> None:
        """Break the link: with ``reset`` both ends see a connection reset, else an orderly close."""
        self._cut.set()
        for s in self._socks:
            try:
                if reset:  # wake the pump without a FIN; the last close then sends RST
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.server.close()


class TcpAgent:
    """``python -m pycriu.migration.agent --listen 127.0.0.1:0 ...`` as a subprocess."""

    def __init__(self, root: Path, *args: str, wrap: Sequence[str] = (), listen: str = "127.0.0.1:0") -> None:
        """``wrap``: a command prefix the agent runs under (``unshare ...``: another view of the host)."""
        self.root = root
        self.log = open(root.parent / f"{root.name}-agent.log", "wb")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        self.proc = subprocess.Popen([*wrap, *AGENT, "--listen", listen, "--root", str(root), *args],
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"agent did not start: {line!r}; see {self.log.name}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"tcp://{listen.rsplit(':', 1)[0]}:{self.port}"

    def close(self) -> None:
        stop_process(self.proc, grace=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def make_certs(d: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl)."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=pycriu test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "IP:127.0.0.1,DNS:localhost")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=pycriu test {name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                                       "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    # a second, unrelated CA and client: must be refused
    run("req", "-x509", *ec, "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem", "-days", "2",
        "-subj", "/CN=rogue CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "rogue.key", "-out", "rogue.csr", "-subj", "/CN=rogue client")
    run("x509", "-req", "-in", "rogue.csr", "-CA", "rogue-ca.pem", "-CAkey", "rogue-ca.key", "-CAcreateserial",
        "-out", "rogue.pem", "-days", "2", "-extfile", "client.ext")
    return {p.stem.replace("-", "_") + ("_key" if p.suffix == ".key" else ""): p
            for p in d.iterdir() if p.suffix in (".pem", ".key")}


class SshServer:
    """Debian's OpenSSH server on 127.0.0.1 with generated host and user keys (root by key only)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pycriu-test-{name}",
                            "-f", str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "user.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowUsers root\nX11Forwarding no\nAllowTcpForwarding no\nPermitTTY no\n")
        host_pub = (d / "host.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.log = open(d / "sshd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()}") from None
                time.sleep(0.05)
        self.url = f"ssh://root@127.0.0.1:{self.port}"
        self.identity = str(d / "user")
        self.options = ["-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "GlobalKnownHostsFile=/dev/null", "-F", "/dev/null"]

    def close(self) -> None:
        stop_process(self.proc, grace=10)
        self.log.close()


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def assert_moved(w: Workload, report: MigrationReport) -> None:
    """The tree runs at the destination (heartbeat advances), its memory is unchanged, the source
    is gone, and the report is coherent and serialisable."""
    source = w.pid
    if report.destination_pid:
        w.adopt(report.destination_pid)  # first: whatever fails below, the copy is cleaned up
        w.pid = source
    assert report.outcome == "migrated", report
    assert report.source_state == "gone"
    assert wait_gone(source), "the source tree still runs"
    assert report.destination_state == "running"
    assert report.destination_pid and report.destination_pid != source
    w.adopt(report.destination_pid)
    before = w.state["beat"]
    w.wait_beats(5)
    assert w.state["beat"] > before
    got, want = w.check_memory(report.destination_pid)  # also for a workload that kept writing
    assert got == want, "the destination's memory is not what the source had written"
    assert report.downtime is not None and 0 < report.downtime < report.total_seconds
    # JSON-serialisable, and back
    again = MigrationReport.from_json(report.to_json())
    assert again == report
    assert json.loads(report.to_json())["mode"] == report.mode
    assert str(report).startswith(f"Migration of pid {source}")
    for path in report.logs.values():
        assert Path(path).is_file(), path


#: The CRIU logs of each flow's page connection (client side, server side).
PAGE_CONNECTION_LOGS = {"page-server": ("source dump", "destination page-server-images"),
                        "lazy": ("source dump", "destination lazy-pages"),
                        "page-server-on-source": ("source page-server", "destination lazy-pages")}


def assert_page_tls(report: MigrationReport, mode: str, encrypted: bool) -> None:
    """Both ends of the flow's CRIU page connection did (or did not) complete a TLS handshake,
    per CRIU's own logs."""
    for label in PAGE_CONNECTION_LOGS.get(mode, ()):
        text = Path(report.logs[label]).read_text()
        assert ("TLS handshake completed" in text) == encrypted, (label, encrypted)


def assert_disk_figures(report: MigrationReport, mode: str, mib: int) -> None:
    """What each flow must have written to disk, per the report (which sums the real files of
    both sides' directories): page images on both sides only for classic, none on the source for
    page-server, none for lazy (CRIU's few non-lazy pages stay in tmpfs on both sides), all on the
    source's disk for page-server-on-source (and the non-lazy ones in the destination's tmpfs)."""
    from pycriu.migration.images import PAGE_SIZE

    memory = mib << 20
    src, dst = report.disk["source"]["page_images"], report.disk["destination"]["page_images"]
    src_ram, dst_ram = report.memory["source"]["page_images"], report.memory["destination"]["page_images"]
    non_lazy = report.pages["in_image_files"] * PAGE_SIZE
    if mode == "classic":
        assert src == dst >= memory and src_ram == dst_ram == 0, (src, dst, src_ram, dst_ram)
    elif mode == "page-server":
        assert src == 0 and dst >= memory and src_ram == dst_ram == 0, (src, dst, src_ram, dst_ram)
    elif mode == "lazy":
        # no page on any disk: CRIU's few non-lazy pages stay in tmpfs on both sides
        assert src == dst == 0 and 0 < src_ram == dst_ram == non_lazy < memory / 4, (src, dst, src_ram, dst_ram)
    elif mode == "page-server-on-source":
        assert src >= memory and dst == src_ram == 0 and 0 < dst_ram == non_lazy < memory / 4, (
            src, dst, src_ram, dst_ram, non_lazy)
    else:
        raise AssertionError(f"no disk expectations for mode {mode!r}")
