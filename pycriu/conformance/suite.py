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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..containers.options import ContainerMount, ContainerOptions
from ..criu import Criu
from ..errors import CriuError, first_error_line
from ..migration.procs import pids_taken
from ..options import CgroupRoot, DumpOptions, RestoreOptions
from .flavor import Flavor, HostFlavor, umount_detached

__all__ = ["MODES", "Outcome", "ZdtmTest", "default_zdtm_dir", "eligible", "load_tests", "run_trial"]

#: ``cli``: the criu binary; ``criu``: :class:`pycriu.Criu`; the rest: :class:`pycriu.Migration` modes.
MODES = ("cli", "criu", "classic", "page-server", "lazy", "page-server-on-source")
#: the modes whose restore takes its pages lazily (zdtm's ``nolazy`` flag rules them out)
LAZY_MODES = ("lazy", "page-server-on-source")

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


def eligible(test: ZdtmTest, criu_bin: str, flavor: str = "h") -> str | None:
    """``None`` if the test can run in ``flavor`` here, else the exact reason it cannot."""
    if flavor not in test.flavors:
        what = "the host flavor" if flavor == "h" else f"the {flavor} flavor"
        return f"flavor {' '.join(test.flavors)} only (not {what})"
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
    flavor: str = "h"

    def as_dict(self) -> dict[str, object]:
        return {"test": self.test, "mode": self.mode, "flavor": self.flavor, "result": self.result,
                "reason": self.reason, "seconds": round(self.seconds, 2)}


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


def _unmount_leftovers(test: ZdtmTest) -> None:
    """Detach what a killed test left mounted in ``static/`` (cgroup00 mounts its ``.test``
    directory and unmounts it only when it ends normally): ``make NAME.cleanout`` cannot remove a
    mount point, and the next start would find it ("Can't make dir: File exists")."""
    prefix = str(test.static_dir.resolve()) + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix) and test.name in point[len(prefix):]:
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        try:
            umount_detached(point)
        except OSError:
            pass


def _make(test: ZdtmTest, target: str, timeout: float, flavor: Flavor) -> subprocess.CompletedProcess[str]:
    """``make --no-print-directory -C DIR TARGET`` as zdtm.py runs it (TMPDIR kept, the
    flavor's environment added)."""
    env = dict(os.environ, TMPDIR=os.environ.get("TMPDIR", "/tmp"), **flavor.env())
    return subprocess.run(["make", "--no-print-directory", "-C", str(flavor.start_dir(test.static_dir)), target],
                          env=env, capture_output=True, text=True, timeout=timeout, close_fds=True)


@dataclass
class _Opts:
    """A test's CRIU options for one half, sorted for pycriu: ``fields`` are pycriu booleans,
    ``other`` long options with one value each (``criu_options``), ``external`` every
    ``--external`` value and ``cgroup_roots`` every ``--cgroup-root [CTRL:]PATH`` (lists: tests
    give several), ``rest`` what fits none of them (a repeated option, a short one)."""

    fields: dict[str, bool] = field(default_factory=dict)
    other: dict[str, str | int | bool] = field(default_factory=dict)
    external: list[str] = field(default_factory=list)
    cgroup_roots: list[CgroupRoot] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)


def _split(opts: Sequence[str]) -> _Opts:
    """CRIU options -> :class:`_Opts`. ``--opt=value`` and ``--opt value`` both give a value."""
    out = _Opts()
    i = 0
    while i < len(opts):
        o = opts[i]
        i += 1
        if o in BOOL_OPTS:
            out.fields[BOOL_OPTS[o]] = True
            continue
        if not o.startswith("--"):
            out.rest.append(o)
            continue
        key, value = o[2:], True
        if "=" in key:
            key, value = key.split("=", 1)  # type: ignore[assignment]
        elif i < len(opts) and not opts[i].startswith("-"):
            value = opts[i]  # type: ignore[assignment]
            i += 1
        if key == "external" and isinstance(value, str):
            out.external.append(value)
        elif key == "cgroup-root" and isinstance(value, str):
            ctrl, _, path = value.rpartition(":")
            out.cgroup_roots.append(CgroupRoot(path, ctrl or None))
        elif key in out.other:
            out.rest.extend([o] if value is True or "=" in o else [o, str(value)])
        else:
            out.other[key] = value
    return out


#: CRIU options with a value that a Migration takes as :class:`~pycriu.containers.ContainerOptions`
CONTAINER_OPTS = ("manage-cgroups", "cgroup-yard", "network-lock", "ext-mount-map",
                  "enable-external-sharing", "enable-external-masters", "mntns-compat-mode", "no-mntns-compat-mode")


def _as_container(base: ContainerOptions | None, dump: _Opts, restore: _Opts) -> ContainerOptions | None:
    """``base`` (the flavor's) plus what the test's options say of the container: cgroups
    (``--manage-cgroups[=MODE]``, ``--cgroup-root [CTRL:]PATH``, ``--cgroup-yard``),
    ``--network-lock``, and its mounts: ``--external mnt[PATH]:KEY`` on dump with
    ``mnt[KEY]:SOURCE`` on restore is one :class:`ContainerMount`, ``mnt[]`` (``:s``, ``:m``) and
    ``--ext-mount-map auto`` are ``auto_ext_mnt`` (with ``ext_sharing``, ``ext_masters``); other
    dump externals stay ``external``. A restore external it cannot place raises :class:`_Skip`."""
    other = {**dump.other, **restore.other}
    extra: dict[str, Any] = {}
    if "manage-cgroups" in other:
        extra["manage_cgroups"] = True
        if isinstance(other["manage-cgroups"], str):
            extra["cgroup_mode"] = other["manage-cgroups"]
    if "network-lock" in other:
        extra["network_lock"] = str(other["network-lock"])
    if dump.cgroup_roots:
        extra["dump_cgroup_roots"] = tuple(dump.cgroup_roots)
    if restore.cgroup_roots:
        extra["cgroup_roots"] = tuple(restore.cgroup_roots)
    if "cgroup-yard" in other:
        extra["cgroup_yard"] = str(other["cgroup-yard"])
    if "ext-mount-map" in other:
        if other["ext-mount-map"] != "auto":
            raise _Skip(f"--ext-mount-map {other['ext-mount-map']} (only 'auto' maps to ContainerOptions)")
        extra["auto_ext_mnt"] = True
    for opt, name in (("enable-external-sharing", "ext_sharing"), ("enable-external-masters", "ext_masters")):
        if opt in other:
            extra[name] = True
    if "mntns-compat-mode" in other:
        extra["mntns_compat_mode"] = True
    sources: dict[str, str] = {}
    for value in restore.external:
        if value.startswith("mnt[]"):
            continue  # the dump's mnt[] below says the same
        if not value.startswith("mnt[") or "]:" not in value:
            raise _Skip(f"restore --external {value} (ContainerOptions takes mnt[KEY]:SOURCE on restore)")
        key, source = value[4:].split("]:", 1)
        # a relative source is CRIU's after its chdir("/") (mount.c); the agent takes absolute paths
        sources[key] = os.path.join("/", source)
    mounts: list[ContainerMount] = []
    external: list[str] = []
    for value in dump.external:
        if value.startswith("mnt[]"):
            flags = value[6:] if value.startswith("mnt[]:") else ""
            extra["auto_ext_mnt"] = True
            extra.update({name: True for c, name in (("s", "ext_sharing"), ("m", "ext_masters")) if c in flags})
        elif value.startswith("mnt[") and "]:" in value:
            path, key = value[4:].split("]:", 1)
            if key not in sources:
                raise _Skip(f"dump --external {value} has no restore mnt[{key}]:SOURCE")
            mounts.append(ContainerMount(path, sources[key], key=key))
        else:
            external.append(value)
    if mounts:
        extra["mounts"] = (*(base.mounts if base else ()), *mounts)
    if external:
        extra["external"] = (*(base.external if base else ()), *external)
    if not extra:
        return base
    return replace(base, **extra) if base is not None else ContainerOptions(**extra)


def _ended(pids: set[int], what: str) -> str:
    """``""`` once the dumped tree's PIDs are free for its restore (zombies reaped), else why not."""
    taken = pids_taken(pids, timeout=10)
    return f"dump: {', '.join(taken)} still taken 10s after {what}" if taken else ""


class _HookFailed(Exception):
    """A test's ``.hook`` exited non-zero (the message says at which step and what it printed)."""


def run_hook(test: ZdtmTest, step: str, *, pid: int | None = None, images: Path | None = None) -> None:
    """Run ``static/NAME.hook STEP`` if the test has one, as zdtm.py does at each step
    (``--post-start``, ``--pre-dump``, ``--pre-restore``, ``--post-restore``, ``--clean``): the
    hook prepares or checks what the test cannot itself (cgroups, iptables, the images)."""
    hook = test.static_dir / f"{test.name}.hook"
    if not os.access(hook, os.X_OK):
        return
    # this interpreter first on PATH: hooks written for CRIU's Python module ("import pycriu";
    # "#!/usr/bin/env python3") get pycriu.images, which offers the same load/dump
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if pid is not None:
        env["ZDTM_TEST_PID"] = str(pid)
    if images is not None:
        env["ZDTM_IMG_DIR"] = str(images)
    p = subprocess.run([str(hook), step], cwd=test.static_dir, env=env, capture_output=True, text=True,
                       timeout=60)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        raise _HookFailed(f"hook {step}: {tail[0]}")


@dataclass
class _Run:
    """What every trial of one test needs: the started test, its processes, where images go."""

    test: ZdtmTest
    pid: int
    pids: set[int]
    images: Path
    criu_bin: str
    flavor: Flavor


def _trial_cli(r: _Run) -> str:
    """``criu dump`` then ``criu restore -d``; returns ``""`` or the error."""
    dump = [r.criu_bin, "dump", "-t", str(r.pid), "-D", str(r.images), "-o", "dump.log", "-v4",
            *r.test.opts("dump"), *r.flavor.dump_opts(), "--timeout", "10"]
    p = subprocess.run(dump, capture_output=True, timeout=120)
    if p.returncode:
        return "dump: " + (_first_error(r.images / "dump.log") or f"criu exited {p.returncode}")
    if err := _ended(r.pids, "criu dump"):
        return err
    r.test.pid_file.unlink(missing_ok=True)  # zdtm.py's unlink_pidfile: restore writes it anew
    run_hook(r.test, "--pre-restore")
    restore = [r.criu_bin, "restore", "-D", str(r.images), "-o", "restore.log", "-v4", "--restore-detached",
               "--pidfile", str(r.test.pid_file.resolve()), *r.test.opts("restore"), *r.flavor.restore_opts()]
    p = subprocess.run(restore, capture_output=True, timeout=120)
    if p.returncode:
        return "restore: " + (_first_error(r.images / "restore.log") or f"criu exited {p.returncode}")
    run_hook(r.test, "--post-restore", pid=_read_pid(r.test), images=r.images)
    return ""


def _trial_criu(r: _Run) -> str:
    """:meth:`pycriu.Criu.dump` then :meth:`pycriu.Criu.restore` with the same options."""
    c = Criu(r.criu_bin)
    d, rs = _split(r.test.opts("dump")), _split(r.test.opts("restore"))
    if d.rest or rs.rest:
        raise _Skip(f"criu_options holds one value per option; {r.test.name} needs " + " ".join(d.rest + rs.rest))
    container = r.flavor.container()
    dump_kw: dict[str, Any] = {**(container.dump_fields() if container else {}), **d.fields}
    restore_kw: dict[str, Any] = {**(container.restore_fields() if container else {}), **rs.fields}
    for kw, opts in ((dump_kw, d), (restore_kw, rs)):
        if opts.external:
            kw["external"] = (*kw.get("external", ()), *opts.external)
        if opts.cgroup_roots:
            kw["cgroup_roots"] = (*kw.get("cgroup_roots", ()), *opts.cgroup_roots)
    dother, rother = d.other, rs.other
    try:
        c.dump(DumpOptions(pid=r.pid, images_dir=r.images, log_file="dump.log", log_level=4, timeout=10,
                           criu_options=dother or None, **dump_kw))
    except CriuError as e:
        return "dump: " + (e.criu_message or _first_error(r.images / "dump.log") or str(e))
    if err := _ended(r.pids, "Criu.dump"):
        return err
    run_hook(r.test, "--pre-restore")
    try:
        res = c.restore(RestoreOptions(images_dir=r.images, log_file="restore.log", log_level=4,
                                       criu_options=rother or None, **restore_kw))
    except CriuError as e:
        return "restore: " + (e.criu_message or _first_error(r.images / "restore.log") or str(e))
    r.test.pid_file.write_text(f"{res.pid}\n")
    run_hook(r.test, "--post-restore", pid=res.pid, images=r.images)
    return ""


def _trial_migration(r: _Run, mode: str) -> str:
    """:class:`pycriu.Migration` to a local agent in ``mode`` (the ns flavor as a container)."""
    from ..migration import Migration
    from ..migration.migration import DUMP_ONLY_CRIU_KEYS
    from ..migration.phases import Progress

    d, rs = _split(r.test.opts("dump")), _split(r.test.opts("restore"))
    container = _as_container(r.flavor.container(), d, rs)
    # options of the dump alone go to Migration(dump_options=); CRIU's restore ignores them, so
    # the copies a test's 'opts' gives the restore too are dropped
    dump_only = {k: v for k, v in d.other.items() if k in DUMP_ONLY_CRIU_KEYS}
    left = [k for k in {**d.other, **rs.other} if k not in CONTAINER_OPTS and k not in DUMP_ONLY_CRIU_KEYS]
    left += [o for o in d.rest + rs.rest if o.startswith("--")]
    if left:
        raise _Skip(f"Migration takes boolean flags, container options and options of the dump alone; "
                    f"{r.test.name} needs " + " ".join(f"--{k}" if not k.startswith("--") else k for k in left))
    agent = r.flavor.agent_command()
    if container is not None:
        # the agent restores a container only under the paths and cgroups it is told to allow:
        # the test's own mount sources and cgroup roots too, as an operator allows a container's
        own = {m.source for m in (r.flavor.container() or ContainerOptions()).mounts}
        allow = [a for m in container.mounts if m.source not in own for a in ("--container-path", m.source)]
        allow += [a for cg in container.cgroup_roots for a in ("--container-cgroup", os.fspath(cg.path))]
        if allow:
            base = agent or [sys.executable, "-m", "pycriu.migration.agent", "--stdio", "--same-host"]
            agent = [*base, *allow]
    hook_error: list[str] = []

    def at_restore(e: Progress) -> None:
        # zdtm's --pre-restore step: after the dump ended the source, before the restore
        # (kept here: Migration ignores what a progress callback raises)
        if e.phase == "restore" and e.event == "start":
            try:
                run_hook(r.test, "--pre-restore")
            except _HookFailed as exc:
                hook_error.append(str(exc))

    try:
        report = Migration(r.pid, to="local", mode=mode, log_dir=r.images, keep_logs=True,
                           criu=Criu(r.criu_bin), flags={**d.fields, **rs.fields}, progress=at_restore,
                           container=container, agent_command=agent,
                           dump_options={"criu_options": dump_only} if dump_only else None).run()
    except CriuError as e:
        msg = e.criu_message or str(e)
        return f"migration: {msg}".splitlines()[0]
    if hook_error:
        return hook_error[0]
    if report.outcome != "migrated":
        return f"migration: outcome {report.outcome}"
    if report.destination_pid:
        r.test.pid_file.write_text(f"{report.destination_pid}\n")
    run_hook(r.test, "--post-restore", pid=report.destination_pid or r.pid, images=r.images)
    return ""


class _Skip(Exception):
    """A mode cannot express what this test needs (the reason is the message)."""


def run_trial(test: ZdtmTest, mode: str, *, criu_bin: str = "/usr/local/sbin/criu",
              work: Path | None = None, timeout: float = 60.0, flavor: Flavor | None = None,
              log: Callable[[str], None] | None = None) -> Outcome:
    """Start ``test`` as zdtm.py does in ``flavor`` (default: the host's namespaces),
    checkpoint/restore it in ``mode``, SIGTERM it, read ``.out``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    flavor = flavor or HostFlavor()
    become_subreaper()
    t0 = time.monotonic()

    def outcome(result: str, reason: str = "") -> Outcome:
        return Outcome(test.name, mode, result, reason, time.monotonic() - t0, flavor.name)

    if mode in LAZY_MODES and "nolazy" in test.flags:
        # zdtm.py skips these in its lazy runs: what they check (pages shared copy-on-write
        # between processes) does not survive a restore with lazy pages
        return outcome("skipped", "flag nolazy (zdtm does not run it with lazy pages)")

    base = Path(tempfile.mkdtemp(prefix=f"pycriu-zdtm-{test.name}-{mode}-{flavor.name}-", dir=work))
    images = base / "images"
    images.mkdir()
    pid = 0
    restored = False
    reaper: _Reaper | None = None
    try:
        flavor.prepare(test.binary, list(test.desc.get("deps", [])))
        _unmount_leftovers(test)
        _make(test, f"{test.name}.cleanout", 60, flavor)
        p = _make(test, f"{test.name}.pid", timeout, flavor)
        if p.returncode:
            return outcome("failed", f"start: {(p.stderr or p.stdout).strip()[-200:]}")
        pid = _read_pid(test)
        reaper = _Reaper(_tree(pid))
        reaper.start()
        run = _Run(test, pid, reaper.pids, images, criu_bin, flavor)
        run_hook(test, "--post-start", pid=pid)
        run_hook(test, "--pre-dump", pid=pid)
        try:
            if mode == "cli":
                err = _trial_cli(run)
            elif mode == "criu":
                err = _trial_criu(run)
            else:
                err = _trial_migration(run, mode)
        except _Skip as s:
            return outcome("skipped", str(s))
        if err:
            return outcome("failed", err)
        restored = True
        pid = _read_pid(test)
        if not _alive(pid):
            return outcome("failed", f"restored test {pid} is not running")
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            return outcome("failed", f"test {pid} did not exit {timeout:.0f}s after SIGTERM")
        try:
            out = test.out_file.read_text(errors="replace")
        except OSError:
            out = ""
        if "PASS" in [w.strip() for w in out.split()]:
            return outcome("passed")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return outcome("failed", "test: " + (lines[-1] if lines else "no output"))
    except _HookFailed as e:
        return outcome("failed", str(e))
    except Exception as e:  # noqa: BLE001 - a trial reports every failure as its outcome
        return outcome("failed", f"{type(e).__name__}: {e}")
    finally:
        if pid:
            _kill(pid)
        if reaper is not None:
            reaper.stop()
        try:
            run_hook(test, "--clean")
        except Exception:  # noqa: BLE001 - the outcome is already decided; --clean is best effort
            pass
        _unmount_leftovers(test)
        if log is not None:
            log(f"{test.name} [{mode}, {flavor.name}] restored={restored} logs in {images}")
        keep = os.environ.get("PYCRIU_CONFORMANCE_KEEP")
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
