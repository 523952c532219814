"""A sample workload to checkpoint and migrate, and its owner (used by the demo, tests and bench).

The program (``python -m pycriu.workload``) fills N MiB with a known pattern and then beats about
every 10 ms, writing its state as one JSON line into a fixed-size (4 KiB) state file it keeps
open. The file never changes size, so CRIU's file-size check holds across a restore. On SIGUSR1 it
recomputes the checksum of its memory and bumps ``check_seq``. Optional parts exercise what CRIU
must restore: child processes talking over pipes, threads, a listening TCP socket.

:class:`Workload` starts it in its own PID namespace (``unshare --pid --fork setsid``) so that a
restore on the same machine never collides on pids, and always cleans up.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STATE_SIZE = 4096
#: What a workload started with ``fifo`` leaves in its FIFO.
FIFO_DATA = b"fifo-data-survives\n"


def _fill(mib: int, seed: int) -> bytearray:
    base = random.Random(seed).randbytes(1 << 20)
    buf = bytearray(mib << 20)
    for i in range(mib):
        shift = (i * 4099) % len(base)
        buf[i << 20:(i + 1) << 20] = base[shift:] + base[:shift]
    return buf


def _digest(buf: bytearray) -> str:
    return hashlib.blake2b(buf, digest_size=16).hexdigest()


def _touch_bytes(mib: int, touch: float, interval: float) -> int:
    """Bytes of memory one beat walks over (it writes the first byte of each page in them)."""
    return int(touch * (mib << 20) * interval)


def _touch(buf: bytearray, offset: int, length: int, beat: int) -> int:
    """One beat's writes: ``beat & 0xFF`` into every 4096th byte of ``length`` bytes from ``offset``
    (wrapping round the buffer); returns the next beat's offset."""
    end = min(offset + length, len(buf))
    buf[offset:end:4096] = bytes([beat & 0xFF]) * len(range(offset, end, 4096))
    return end % len(buf)


def memory_digest(mib: int, seed: int, touch: float, interval: float, beat: int) -> str:
    """The checksum a workload started with these arguments reports for ``beat``: its pattern with
    the writes of beats 1..``beat`` replayed. The writes depend on the beat number only, so this is
    what its memory holds, however often it was frozen, dumped or moved in between; a page that a
    migration lost or left stale shows as a different digest."""
    buf = _fill(mib, seed)
    length, offset = _touch_bytes(mib, touch, interval), 0
    if length and buf:
        for b in range(1, beat + 1):
            offset = _touch(buf, offset, length, b)
    return _digest(buf)


def _child_main(rfd: int, wfd: int) -> None:
    """A tree member: echo every byte the parent sends back, until the pipe closes."""
    while True:
        data = os.read(rfd, 64)
        if not data:
            os._exit(0)
        os.write(wfd, data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--state", required=True, help="state file (created, 4 KiB, kept open)")
    ap.add_argument("--mib", type=int, default=16, help="memory to fill with the pattern")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--children", type=int, default=0, help="child processes echoing over pipes")
    ap.add_argument("--threads", type=int, default=0, help="threads counting in the background")
    ap.add_argument("--listen", type=int, default=None, help="listen on 127.0.0.1:PORT (0: any)")
    ap.add_argument("--unix", default=None, help="listen on a Unix socket bound to this path")
    ap.add_argument("--fifo", default=None, help="make this FIFO, hold it open and leave FIFO_DATA in it")
    ap.add_argument("--lock", default=None, help="hold an exclusive flock on this file (created)")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between beats")
    ap.add_argument("--touch", type=float, default=0.0,
                    help="fraction of memory rewritten per second (dirty rate); changes the checksum")
    args = ap.parse_args(argv)

    buf = _fill(args.mib, args.seed)
    checksum0 = _digest(buf)
    fd = os.open(args.state, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, STATE_SIZE)

    pipes = []
    for _ in range(args.children):
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        if os.fork() == 0:
            os.close(down_w)
            os.close(up_r)
            _child_main(down_r, up_w)
        os.close(down_r)
        os.close(up_w)
        pipes.append((down_w, up_r))

    counters = [0] * args.threads

    def count(i: int) -> None:
        while True:
            counters[i] += 1
            time.sleep(0.005)

    for i in range(args.threads):
        threading.Thread(target=count, args=(i,), daemon=True).start()

    port = None
    if args.listen is not None:
        lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsk.bind(("127.0.0.1", args.listen))
        lsk.listen(8)
        port = lsk.getsockname()[1]

        def serve() -> None:
            while True:
                conn, _ = lsk.accept()
                with conn:
                    conn.sendall(f"alive {checksum0}\n".encode())

        threading.Thread(target=serve, daemon=True).start()

    if args.unix is not None:
        usk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        usk.bind(args.unix)
        usk.listen(8)

        def serve_unix() -> None:
            while True:
                conn, _ = usk.accept()
                with conn:
                    conn.sendall(f"alive {checksum0}\n".encode())

        threading.Thread(target=serve_unix, daemon=True).start()

    if args.fifo is not None:
        os.mkfifo(args.fifo)
        fifo_fd = os.open(args.fifo, os.O_RDWR)  # kept open: the data waits in the pipe for a reader
        os.write(fifo_fd, FIFO_DATA)

    if args.lock is not None:
        lock_fd = os.open(args.lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    want_check = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: want_check.set())
    state: dict[str, Any] = {"pid": os.getpid(), "mib": args.mib, "checksum0": checksum0,
                             "checksum": checksum0, "check_seq": 0, "check_beat": 0, "beat": 0, "echoes": 0,
                             "threads": 0, "port": port}
    touch_bytes = _touch_bytes(args.mib, args.touch, args.interval)
    offset = 0
    while True:
        state["beat"] += 1
        state["t"] = time.time()
        for down_w, up_r in pipes:
            os.write(down_w, b"x")
            if os.read(up_r, 1) == b"x":
                state["echoes"] += 1
        state["threads"] = sum(counters)
        if touch_bytes and buf:
            offset = _touch(buf, offset, touch_bytes, state["beat"])
        if want_check.is_set():
            want_check.clear()
            state["checksum"] = _digest(buf)
            state["check_beat"] = state["beat"]  # the line may be read beats later
            state["check_seq"] += 1
        os.pwrite(fd, json.dumps(state).encode().ljust(STATE_SIZE - 1) + b"\n", 0)
        time.sleep(args.interval)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The workload's last state (``{}`` before its first beat)."""
    try:
        text = Path(path).read_bytes().decode(errors="replace").strip().strip("\0")
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


class PidNamespaceTree:
    """Owner of a command started as the init of its own PID namespace and session
    (``unshare --pid --fork setsid ARGV``), and of every copy of it restored later.

    A restore on the same machine then never collides on pids, and the tree leads its session
    inside its namespace, as CRIU requires. ``pid`` is the tree's root in this namespace; after a
    migration or restore, :meth:`adopt` the new root so :meth:`close` kills and reaps it too.
    """

    def __init__(self, argv: list[str], *, cwd: str | os.PathLike[str], env: dict[str, str] | None = None,
                 start_timeout: float = 10.0, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that execs the rest in place (``nsenter --net=...``: another
        network namespace)."""
        self.unshare = subprocess.Popen(
            [*prefix, "unshare", "--pid", "--fork", "setsid", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, cwd=cwd,
        )
        self.pid = 0
        self.pids: list[int] = []
        try:
            self.adopt(self._find_child(start_timeout))
        except BaseException:
            self.close()
            raise

    def _find_child(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        path = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        while time.monotonic() < deadline:
            try:
                children = path.read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            if self.unshare.poll() is not None:
                raise RuntimeError(f"workload exited at once (status {self.unshare.returncode})")
            time.sleep(0.005)
        raise TimeoutError("workload did not start")

    @property
    def exited(self) -> bool:
        """The original tree is gone and no copy was adopted."""
        return len(self.pids) <= 1 and self.unshare.poll() is not None

    def adopt(self, pid: int) -> None:
        """Take ownership of a copy of the tree rooted at ``pid`` (it becomes :attr:`pid`)."""
        self.pid = pid
        if pid not in self.pids:
            self.pids.append(pid)

    def close(self) -> None:
        """Kill every copy (source and restored) and reap the ones that are our children; wait
        for the others to be gone (their reaper is someone else)."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    if not alive(pid):
                        break
                    time.sleep(0.005)
                    continue
                if done:
                    break
                time.sleep(0.005)
        if self.unshare.poll() is None:
            self.unshare.kill()
        self.unshare.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Workload:
    """Owner of one sample workload in its own PID namespace.

    ``pid`` is the workload's pid in this namespace (the root of the tree to dump). After a
    migration or restore, call :meth:`adopt` with the new root pid so :meth:`close` cleans it up.
    """

    def __init__(self, state_path: str | os.PathLike[str], *, mib: int = 16, children: int = 0,
                 threads: int = 0, listen: int | None = None, unix: str | os.PathLike[str] | None = None,
                 fifo: str | os.PathLike[str] | None = None, lock: str | os.PathLike[str] | None = None,
                 touch: float = 0.0,
                 interval: float = 0.01, python: str | None = None, netns: str | None = None) -> None:
        self.state_path = Path(state_path)
        self._args = (mib, 1, touch, interval)  # as memory_digest takes them (--seed stays 1)
        argv = [python or sys.executable, "-m", "pycriu.workload", "--state", str(self.state_path),
                "--mib", str(mib), "--children", str(children), "--threads", str(threads),
                "--interval", str(interval), "--touch", str(touch)]
        if listen is not None:
            argv += ["--listen", str(listen)]
        if unix is not None:
            argv += ["--unix", os.fspath(unix)]
        if fifo is not None:
            argv += ["--fifo", os.fspath(fifo)]
        if lock is not None:
            argv += ["--lock", os.fspath(lock)]
        self.state_path.unlink(missing_ok=True)
        # CRIU's parasite mounts a scratch proc in the dumped task's working directory
        # ("proc.crtools"): each workload gets its own, so two dumps at once do not collide.
        self.workdir = self.state_path.parent / f"{self.state_path.name}.cwd"
        self.workdir.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns is not None else []
        self._tree = PidNamespaceTree(argv, cwd=self.workdir, env=env, prefix=prefix)
        try:
            self.wait_beats(1, timeout=max(30.0, mib / 20))
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The root of the tree now (the source, or the copy last adopted)."""
        return self._tree.pid

    @pid.setter
    def pid(self, value: int) -> None:
        self._tree.pid = value

    @property
    def state(self) -> dict[str, Any]:
        return read_state(self.state_path)

    def wait_beats(self, more: int = 1, timeout: float = 20.0, *, since: int | None = None) -> dict[str, Any]:
        """Wait until the heartbeat advanced by ``more`` beats past ``since`` (default: now)."""
        start = self.state.get("beat", 0) if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state
            if st.get("beat", 0) >= start + more:
                return st
            time.sleep(0.01)
        raise TimeoutError(f"workload heartbeat stuck at {self.state.get('beat')} (wanted {start + more})")

    def checksum(self, pid: int | None = None, timeout: float = 30.0) -> str:
        """Ask the workload (now at ``pid``) to checksum its memory; return the digest."""
        return str(self._checked_state(pid, timeout)["checksum"])

    def _checked_state(self, pid: int | None, timeout: float) -> dict[str, Any]:
        """Ask for a checksum; the first state line that carries it."""
        seq = self.state.get("check_seq", 0)
        os.kill(pid or self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state
            if st.get("check_seq", 0) > seq:
                return st
            time.sleep(0.01)
        raise TimeoutError("workload did not answer the checksum request")

    @property
    def expected_checksum(self) -> str:
        """The checksum of the untouched pattern (the memory of a workload started with touch=0)."""
        return str(self.state["checksum0"])

    def check_memory(self, pid: int | None = None, timeout: float = 30.0) -> tuple[str, str]:
        """Ask the workload (now at ``pid``) to checksum its memory; return that checksum and the one
        its memory must have at the beat it was taken in (:func:`memory_digest`). Equal for a
        workload that keeps writing (``touch``) only if no write was lost on the way."""
        st = self._checked_state(pid, timeout)
        return str(st["checksum"]), memory_digest(*self._args, int(st["check_beat"]))

    def adopt(self, pid: int) -> None:
        """Take ownership of the tree restored at ``pid`` (killed and reaped by :meth:`close`)."""
        self._tree.adopt(pid)

    def alive(self, pid: int | None = None) -> bool:
        """Whether ``pid`` (default: the current root) runs and is not a zombie."""
        return alive(pid or self.pid)

    def close(self) -> None:
        """Kill every tree this workload ever was (source and restored copies) and reap them."""
        self._tree.close()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
