"""Which zdtm tests can run here, and one trial of one test in one mode.

A trial follows ``zdtm.py``: ``make NAME.cleanout``, ``make NAME.pid`` (the test is ready when
make returns), dump with the ``.desc`` file's ``opts``/``dopts`` and ``--timeout 10``, restore
detached with ``opts``/``ropts``, SIGTERM the restored test, wait for it to go, and look for
``PASS`` in its ``.out``. Every path ends with the test (and anything left of it) killed.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..criu import Criu
from ..errors import CriuError, first_error_line
from ..migration.procs import pids_taken
from ..options import DumpOptions, RestoreOptions

__all__ = ["MODES", "Outcome", "ZdtmTest", "default_zdtm_dir", "eligible", "load_tests", "run_trial"]

#: ``cli``: the criu binary; ``criu``: :class:`pycriu.Criu`; the rest: :class:`pycriu.Migration` modes.
MODES = ("cli", "criu", "classic", "page-server", "lazy", "page-server-on-source")

#: Flags of a ``.desc`` that keep a test out of a plain host run (as ``zdtm.py`` reads them):
#: ``crfail`` (dump is expected to fail), ``reqrst`` (needs restore-time setup zdtm does itself),
#: ``noauto`` (zdtm runs it only when named), ``crlib`` (needs CRIU plugins built into zdtm's tree).
#: ``nouser`` only rules out the user-ns flavor, so it does not matter for the host flavor; and
#: ``suid`` only says the test must keep root (zdtm.py drops the others to uid 18943), which every
#: test does here (no ``ZDTM_UID``).
SKIP_FLAGS = ("crfail", "reqrst", "noauto", "crlib")

#: CRIU options pycriu has a field for (``--tcp-established`` -> ``tcp_established``); these are
#: also what a :class:`pycriu.Migration` passes on as ``flags``.
BOOL_OPTS = {"--tcp-established": "tcp_established", "--file-locks": "file_locks",
             "--link-remap": "link_remap", "--ext-unix-sk": "ext_unix_sk",
             "--evasive-devices": "evasive_devices", "--shell-job": "shell_job",
             "--tcp-close": "tcp_close", "--weak-sysctls": "weak_sysctls",
             "--skip-file-rwx-check": "skip_file_rwx_check"}


def default_zdtm_dir() -> Path:
    """Where ``scripts/zdtm.sh`` builds zdtm (``$PYCRIU_ZDTM_DIR``, else ``build/zdtm`` of the checkout)."""
    env = os.environ.get("PYCRIU_ZDTM_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "zdtm"


@dataclass(frozen=True)
class ZdtmTest:
    """One zdtm test: its program in ``static/`` and its parsed ``.desc`` (empty when none)."""

    name: str
    static_dir: Path
    desc: dict[str, str] = field(default_factory=dict)

    @property
    def flags(self) -> list[str]:
        return str(self.desc.get("flags", "")).split()

    @property
    def flavors(self) -> list[str]:
        return str(self.desc.get("flavor", "h ns uns")).split()

    def opts(self, which: str) -> list[str]:
        """``opts`` plus ``dopts`` (which="dump") or ``ropts`` (which="restore"), split."""
        extra = self.desc.get("dopts" if which == "dump" else "ropts", "")
        return str(self.desc.get("opts", "")).split() + str(extra).split()

    @property
    def binary(self) -> Path:
        return self.static_dir / self.name

    @property
    def out_file(self) -> Path:
        return self.static_dir / f"{self.name}.out"

    @property
    def pid_file(self) -> Path:
        return self.static_dir / f"{self.name}.pid"


def load_tests(zdtm_dir: Path) -> list[ZdtmTest]:
    """Every built test program of ``static/`` (a ``.c`` with its binary), with its ``.desc``."""
    static = zdtm_dir / "static"
    tests = []
    for src in sorted(static.glob("*.c")):
        name = src.stem
        if not (static / name).is_file():
            continue
        desc_path = static / f"{name}.desc"
        desc: dict[str, str] = {}
        if desc_path.exists():
            text = desc_path.read_text().strip()
            if text:
                try:
                    parsed = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    # zdtm.py evals a few .desc files as code reading its environment
                    # (mnt_ext_dev): tests it sets up by hand, noauto for the rest of it
                    parsed = {"flags": "noauto"}
                desc = {str(k): v for k, v in parsed.items()} if isinstance(parsed, dict) else {}
        tests.append(ZdtmTest(name, static, desc))
    return tests


_feature_cache: dict[str, bool] = {}


def _has_feature(criu_bin: str, feature: str) -> bool:
    """``criu check --feature NAME`` succeeds (what ``zdtm.py`` asks for a ``.desc`` feature)."""
    if feature not in _feature_cache:
        r = subprocess.run([criu_bin, "check", "--feature", feature], capture_output=True, timeout=60)
        _feature_cache[feature] = r.returncode == 0
    return _feature_cache[feature]


def eligible(test: ZdtmTest, criu_bin: str) -> str | None:
    """``None`` if the test can run in the host flavor here, else the exact reason it cannot."""
    if "h" not in test.flavors:
        return f"flavor {' '.join(test.flavors)} only (not the host flavor)"
    for flag in SKIP_FLAGS:
        if flag in test.flags:
            return f"flag {flag}"
    if test.desc.get("arch") and test.desc.get("arch") != os.uname().machine:
        return f"arch {test.desc['arch']} only"
    for feature in str(test.desc.get("feature", "")).split():
        if not _has_feature(criu_bin, feature):
            return f"criu check --feature {feature} fails on this host"
    checkskip = test.static_dir / f"{test.name}.checkskip"
    if checkskip.exists():
        r = subprocess.run([str(checkskip)], cwd=test.static_dir, capture_output=True, timeout=60)
        if r.returncode != 0:
            return f"{checkskip.name} says this host cannot run it"
    return None


@dataclass
class Outcome:
    """One trial: ``passed``/``failed``/``skipped``, with why (CRIU's first error line on failure)."""

    test: str
    mode: str
    result: str
    reason: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"test": self.test, "mode": self.mode, "result": self.result, "reason": self.reason,
                "seconds": round(self.seconds, 2)}


def _first_error(log: Path) -> str:
    """CRIU's first meaningful error line in ``log`` (pycriu's own reading: harmless noise skipped)."""
    return first_error_line(log) or ""


def _read_pid(test: ZdtmTest) -> int:
    return int(test.pid_file.read_text().split()[0])


def become_subreaper() -> None:
    """Make this process the child subreaper: zdtm tests daemonize and restored trees outlive
    CRIU, so without it they are reparented to PID 1, and a PID 1 that does not reap (a container's
    init, some sandboxes) leaves them zombies whose PIDs a restore then cannot take back
    ("Can't fork for PID: File exists"). As subreaper, :func:`_alive` reaps them."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (reaped here when it is our child: see become_subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants, from ``/proc/PID/task/*/children``."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return seen


class _Reaper(threading.Thread):
    """Reaps the test's processes (and only those) while a trial runs: killed by the dump they
    are reparented to this subreaper, and their zombies would keep the PIDs the restore needs.
    The PIDs of a restored host-flavor tree are the dumped ones, so one set covers both."""

    def __init__(self, pids: set[int]) -> None:
        super().__init__(daemon=True, name="zdtm-reaper")
        self.pids = set(pids)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            for p in list(self.pids):
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass

    def stop(self) -> None:
        self.done.set()
        self.join()


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _kill(pid: int) -> None:
    """SIGKILL ``pid``'s whole session (zdtm tests call setsid; their helpers share it)."""
    if pid <= 1:
        return
    victims = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                if os.getsid(int(entry)) == pid:
                    victims.append(int(entry))
            except OSError:
                pass
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except OSError:
            pass
    _wait_gone(pid, 5)


def _make(test: ZdtmTest, target: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``make --no-print-directory -C static TARGET`` as zdtm.py runs it (TMPDIR kept)."""
    env = dict(os.environ, TMPDIR=os.environ.get("TMPDIR", "/tmp"))
    return subprocess.run(["make", "--no-print-directory", "-C", str(test.static_dir), target],
                          env=env, capture_output=True, text=True, timeout=timeout, close_fds=True)


def _split(opts: Sequence[str]) -> tuple[dict[str, bool], dict[str, str | int | bool], list[str]]:
    """CRIU options -> (pycriu boolean fields, other long options for criu_options, unparsed).
    ``--opt=value`` and ``--opt value`` both give a value; a repeated option is unparsed
    (criu_options holds one value per option)."""
    fields: dict[str, bool] = {}
    other: dict[str, str | int | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(opts):
        o = opts[i]
        i += 1
        if o in BOOL_OPTS:
            fields[BOOL_OPTS[o]] = True
            continue
        if not o.startswith("--"):
            rest.append(o)
            continue
        key, value = o[2:], True
        if "=" in key:
            key, value = key.split("=", 1)  # type: ignore[assignment]
        elif i < len(opts) and not opts[i].startswith("-"):
            value = opts[i]  # type: ignore[assignment]
            i += 1
        if key in other:
            rest.extend([o] if value is True or "=" in o else [o, str(value)])
        else:
            other[key] = value
    return fields, other, rest


def _ended(pids: set[int], what: str) -> str:
    """``""`` once the dumped tree's PIDs are free for its restore (zombies reaped), else why not."""
    taken = pids_taken(pids, timeout=10)
    return f"dump: {', '.join(taken)} still taken 10s after {what}" if taken else ""


def _trial_cli(test: ZdtmTest, pid: int, pids: set[int], images: Path, criu_bin: str) -> str:
    """``criu dump`` then ``criu restore -d``; returns ``""`` or the error."""
    dump = [criu_bin, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4",
            *test.opts("dump"), "--timeout", "10"]
    r = subprocess.run(dump, capture_output=True, timeout=120)
    if r.returncode:
        return "dump: " + (_first_error(images / "dump.log") or f"criu exited {r.returncode}")
    if err := _ended(pids, "criu dump"):
        return err
    test.pid_file.unlink(missing_ok=True)  # zdtm.py's unlink_pidfile: restore writes it anew
    restore = [criu_bin, "restore", "-D", str(images), "-o", "restore.log", "-v4", "--restore-detached",
               "--pidfile", str(test.pid_file.resolve()), *test.opts("restore")]
    r = subprocess.run(restore, capture_output=True, timeout=120)
    if r.returncode:
        return "restore: " + (_first_error(images / "restore.log") or f"criu exited {r.returncode}")
    return ""


def _trial_criu(test: ZdtmTest, pid: int, pids: set[int], images: Path, criu_bin: str) -> str:
    """:meth:`pycriu.Criu.dump` then :meth:`pycriu.Criu.restore` with the same options."""
    c = Criu(criu_bin)
    dfields, dother, drest = _split(test.opts("dump"))
    rfields, rother, rrest = _split(test.opts("restore"))
    if drest or rrest:
        raise _Skip(f"criu_options holds one value per option; {test.name} needs " + " ".join(drest + rrest))
    try:
        c.dump(DumpOptions(pid=pid, images_dir=images, log_file="dump.log", log_level=4, timeout=10,
                           criu_options=dother or None, **dfields))  # type: ignore[arg-type]
    except CriuError as e:
        return "dump: " + (e.criu_message or _first_error(images / "dump.log") or str(e))
    if err := _ended(pids, "Criu.dump"):
        return err
    try:
        res = c.restore(RestoreOptions(images_dir=images, log_file="restore.log", log_level=4,
                                       criu_options=rother or None, **rfields))  # type: ignore[arg-type]
    except CriuError as e:
        return "restore: " + (e.criu_message or _first_error(images / "restore.log") or str(e))
    test.pid_file.write_text(f"{res.pid}\n")
    return ""


def _trial_migration(test: ZdtmTest, pid: int, images: Path, mode: str, criu_bin: str) -> str:
    """:class:`pycriu.Migration` to a local agent in ``mode``."""
    from ..migration import Migration

    fields, other, _ = _split(test.opts("dump"))
    rfields, rother, _ = _split(test.opts("restore"))
    if other or rother:
        raise _Skip(f"Migration takes only boolean flags; {test.name} needs "
                    + " ".join(f"--{k}" for k in {**other, **rother}))
    try:
        report = Migration(pid, to="local", mode=mode, log_dir=images, keep_logs=True,
                           criu=Criu(criu_bin), flags={**fields, **rfields}).run()
    except CriuError as e:
        msg = e.criu_message or str(e)
        return f"migration: {msg}".splitlines()[0]
    if report.outcome != "migrated":
        return f"migration: outcome {report.outcome}"
    return ""


class _Skip(Exception):
    """A mode cannot express what this test needs (the reason is the message)."""


def run_trial(test: ZdtmTest, mode: str, *, criu_bin: str = "/usr/local/sbin/criu",
              work: Path | None = None, timeout: float = 60.0,
              log: Callable[[str], None] | None = None) -> Outcome:
    """Start ``test`` as zdtm.py does, checkpoint/restore it in ``mode``, SIGTERM it, read ``.out``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    become_subreaper()
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix=f"pycriu-zdtm-{test.name}-{mode}-", dir=work))
    images = base / "images"
    images.mkdir()
    pid = 0
    restored = False
    reaper: _Reaper | None = None
    try:
        _make(test, f"{test.name}.cleanout", 60)
        r = _make(test, f"{test.name}.pid", timeout)
        if r.returncode:
            return Outcome(test.name, mode, "failed", f"start: {(r.stderr or r.stdout).strip()[-200:]}",
                           time.monotonic() - t0)
        pid = _read_pid(test)
        reaper = _Reaper(_tree(pid))
        reaper.start()
        try:
            if mode == "cli":
                err = _trial_cli(test, pid, reaper.pids, images, criu_bin)
            elif mode == "criu":
                err = _trial_criu(test, pid, reaper.pids, images, criu_bin)
            else:
                err = _trial_migration(test, pid, images, mode, criu_bin)
        except _Skip as s:
            return Outcome(test.name, mode, "skipped", str(s), time.monotonic() - t0)
        if err:
            return Outcome(test.name, mode, "failed", err, time.monotonic() - t0)
        restored = True
        pid = _read_pid(test)
        if not _alive(pid):
            return Outcome(test.name, mode, "failed", f"restored test {pid} is not running",
                           time.monotonic() - t0)
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            return Outcome(test.name, mode, "failed", f"test {pid} did not exit {timeout:.0f}s after SIGTERM",
                           time.monotonic() - t0)
        try:
            out = test.out_file.read_text(errors="replace")
        except OSError:
            out = ""
        if "PASS" in [w.strip() for w in out.split()]:
            return Outcome(test.name, mode, "passed", "", time.monotonic() - t0)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return Outcome(test.name, mode, "failed", "test: " + (lines[-1] if lines else "no output"),
                       time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - a trial reports every failure as its outcome
        return Outcome(test.name, mode, "failed", f"{type(e).__name__}: {e}", time.monotonic() - t0)
    finally:
        if pid:
            _kill(pid)
        if reaper is not None:
            reaper.stop()
        if log is not None:
            log(f"{test.name} [{mode}] restored={restored} logs in {images}")
        keep = os.environ.get("PYCRIU_CONFORMANCE_KEEP")
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
