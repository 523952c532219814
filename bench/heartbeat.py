"""The compiled heartbeat workload: build it, run it in its own PID namespace, read its beats.

Downtime is measured from the workload's own heartbeat, never from what the migration code says:
the workload keeps a ring of its last beats (sequence number, CLOCK_REALTIME ns, CLOCK_MONOTONIC
ns) in a fixed-size file, and after a migration the harness reads that ring and finds the longest
gap. The harness compares CLOCK_REALTIME stamps with its own ``time.time_ns()``: CRIU restores a
tree that has its own PID namespace into a new time namespace whose CLOCK_MONOTONIC is shifted
back by the downtime, so the restored workload's monotonic clock hides the gap (that shift is
reported as ``clock_shift``); CLOCK_REALTIME is not namespaced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pycriu.workload import PidNamespaceTree

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "workload.c"
BUILD_DIR = HERE / ".build"

HEADER = 4096
RECORD = 32
MAGIC = 0x3130304248424350
# Header fields (u64, byte offsets), as in workload.c.
H_MAGIC, H_VERSION, H_RING, H_INTERVAL_NS, H_MIB, H_RATE_PPM = 0, 8, 16, 24, 32, 40
H_SEQ, H_FILL_NS, H_VERIFY_COUNT, H_VERIFY_BAD, H_PAGES_WRITTEN = 48, 56, 64, 72, 80


def compile_c(source: Path, name: str, cc: str | None = None) -> Path:
    """Compile the C program ``source`` into ``bench/.build/NAME-HASH`` (cached by the source's
    hash); return the binary."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = BUILD_DIR / f"{name}-{digest}"
    if binary.exists():
        return binary
    compiler = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError(f"no C compiler found (install gcc) to build bench/{source.name}")
    BUILD_DIR.mkdir(exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source)], check=True)
    tmp.rename(binary)
    return binary


def build(cc: str | None = None) -> Path:
    """Compile ``workload.c`` into ``bench/.build/`` (cached by the source's hash); return the binary."""
    return compile_c(SOURCE, "workload", cc)


@dataclass(frozen=True)
class Beats:
    """A snapshot of the ring, oldest first: sequence numbers, CLOCK_REALTIME stamps ``t`` and
    the workload's own CLOCK_MONOTONIC stamps ``mono`` (ns)."""

    seq: list[int]
    t: list[int]
    mono: list[int]
    header: dict[str, int]


def read_beats(path: str | os.PathLike[str]) -> Beats:
    """Read the heartbeat file; only records consistent with their slot are kept."""
    data = Path(path).read_bytes()
    if len(data) < HEADER:
        return Beats([], [], [], {})
    fields = struct.unpack_from("<11Q", data, 0)
    names = ("magic", "version", "ring", "interval_ns", "mib", "rate_ppm", "seq", "fill_ns",
             "verify_count", "verify_bad", "pages_written")
    header = dict(zip(names, fields, strict=True))
    if header["magic"] != MAGIC:
        return Beats([], [], [], header)
    ring, newest = header["ring"], header["seq"]
    n = min(ring, newest, (len(data) - HEADER) // RECORD)
    seqs: list[int] = []
    ts: list[int] = []
    monos: list[int] = []
    for s in range(newest - n, newest):
        rs, rt, rm, _ = struct.unpack_from("<QQQQ", data, HEADER + (s % ring) * RECORD)
        if rs == s and rt:
            seqs.append(rs)
            ts.append(rt)
            monos.append(rm)
    return Beats(seqs, ts, monos, header)


@dataclass(frozen=True)
class GapAnalysis:
    """What the heartbeat says about one migration (all times in ns, CLOCK_REALTIME)."""

    nominal_interval_ns: float   # mean beat interval before the migration
    last_before_ns: int          # last beat before the longest gap (the freeze is right after)
    first_after_ns: int          # first beat after it (resumed on the destination)
    downtime_ns: int             # the longest gap
    full_speed_ns: int           # from here on the beat interval is back to normal
    missing_beats: int           # sequence numbers missing in the window (should be 0)
    clock_shift_ns: int          # how far the workload's CLOCK_MONOTONIC moved against CLOCK_REALTIME
                                 # across the gap (CRIU's time namespace hides the downtime: ~ -downtime)


#: Beats this long after the end of a flow still belong to its window: the first beat of the
#: restored workload may come after ``criu restore`` has returned and the harness took its time.
END_MARGIN_NS = 250_000_000


def analyse(beats: Beats, start_ns: int, end_ns: int, *, window: int = 50, tolerance: float = 1.25) -> GapAnalysis:
    """Find the migration in ``beats`` between ``start_ns`` and ``end_ns`` (+ :data:`END_MARGIN_NS`).

    Downtime: the longest gap between consecutive beats in that window. Full speed: the start of
    the first run of ``window`` beats after the resume whose mean interval is at most
    ``tolerance`` times the mean interval of the beats before ``start_ns``.
    """
    end_ns += END_MARGIN_NS
    before = [t for t in beats.t if t < start_ns][-500:]
    if len(before) >= 2:
        nominal = (before[-1] - before[0]) / (len(before) - 1)
    else:
        nominal = float(beats.header.get("interval_ns", 1_000_000))
    idx = [i for i, t in enumerate(beats.t) if t <= end_ns]
    # include the last beat before the start, so a freeze right at start_ns is seen
    first = max(0, next((i for i, t in enumerate(beats.t) if t >= start_ns), len(beats.t)) - 1)
    idx = [i for i in idx if i >= first]
    if len(idx) < 2:
        raise ValueError("no heartbeat around the migration (the workload did not resume?)")
    best = max(range(idx[0], idx[-1]), key=lambda i: beats.t[i + 1] - beats.t[i])
    gap = beats.t[best + 1] - beats.t[best]
    resume = best + 1
    full = beats.t[resume]
    limit = nominal * tolerance
    ts = beats.t
    for j in range(resume, len(ts) - window):
        if (ts[j + window] - ts[j]) / window <= limit:
            full = ts[j]
            break
    else:
        full = ts[-1]
    missing = (beats.seq[idx[-1]] - beats.seq[idx[0]]) - (idx[-1] - idx[0])
    shift = (beats.mono[resume] - beats.mono[best]) - gap
    return GapAnalysis(nominal, beats.t[best], beats.t[resume], gap, full, missing, shift)


class HeartbeatWorkload:
    """One heartbeat workload in its own PID namespace and session (``unshare --pid --fork setsid``).

    ``pid`` is its pid in the harness's namespace (the root of the tree to migrate). After a
    migration, :meth:`adopt` the destination's pid so :meth:`close` kills it too.
    """

    def __init__(self, binary: Path, hb_path: Path, *, mib: int, rate: float,
                 interval_us: int = 1000, ring: int = 65536, warmup_beats: int = 300) -> None:
        self.hb_path = Path(hb_path)
        self.mib = mib
        self.hb_path.unlink(missing_ok=True)
        argv = [str(binary), "--hb", str(self.hb_path), "--mib", str(mib), "--rate", repr(rate),
                "--interval-us", str(interval_us), "--ring", str(ring)]
        # Its own working directory: CRIU's parasite mounts a private /proc on "proc.crtools"
        # relative to the dumped task's cwd when the task is in its own PID namespace, so two dumps
        # at once of tasks sharing a cwd (say "/") collide with "Can't create a directory (-17)".
        self._tree = PidNamespaceTree(argv, cwd=self.hb_path.parent)
        try:
            self.wait_beats(warmup_beats, timeout=30 + mib / 50)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The root of the workload now (the source, or the copy last adopted)."""
        return self._tree.pid

    def beats(self) -> Beats:
        return read_beats(self.hb_path)

    def seq(self) -> int:
        try:
            with open(self.hb_path, "rb") as f:
                head = f.read(H_SEQ + 8)
        except OSError:
            return 0
        if len(head) < H_SEQ + 8 or struct.unpack_from("<Q", head, H_MAGIC)[0] != MAGIC:
            return 0
        return int(struct.unpack_from("<Q", head, H_SEQ)[0])

    def wait_beats(self, count: int, timeout: float, *, since: int | None = None) -> int:
        """Wait until ``count`` more beats than ``since`` (default: now) were written."""
        start = self.seq() if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.seq()
            if s >= start + count:
                return s
            if self._tree.exited:
                raise RuntimeError(f"workload exited (status {self._tree.unshare.returncode})")
            time.sleep(0.005)
        raise TimeoutError(f"heartbeat stuck at {self.seq()} (wanted {start + count})")

    def verify(self, timeout: float = 60.0) -> int:
        """Ask the workload (wherever it runs now) to check every page; return the bad-page count."""
        header = self.beats().header
        before = header.get("verify_count", 0)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            header = self.beats().header
            if header.get("verify_count", 0) > before:
                return int(header["verify_bad"])
            time.sleep(0.01)
        raise TimeoutError("workload did not answer the verification request")

    def adopt(self, pid: int) -> None:
        """Own the copy restored at ``pid`` too (killed by :meth:`close`)."""
        self._tree.adopt(pid)

    def close(self) -> None:
        """Kill every copy of the workload (source and restored) and reap what is ours to reap."""
        self._tree.close()

    def __enter__(self) -> HeartbeatWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
