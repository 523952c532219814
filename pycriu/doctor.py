"""``pycriu doctor``: is this machine ready to checkpoint, restore and migrate?

Each check reports a verdict (ok / warn / fail / info) and, when it is not ok, the fix. The
overall result is ready only when dump and restore can work (root, a usable CRIU >= 4.2 that
passes ``criu check``). It also says which migration flows this machine supports.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import _raw, kdat
from .criu import MIN_CRIU_VERSION, Criu, required_version
from .errors import INSTALL_CRIU, CriuError

__all__ = ["Check", "Diagnosis", "diagnose", "main"]

PIPE_MAX_NEEDED = 4 << 20
# Capability bits (linux/capability.h).
_CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_CHECKPOINT_RESTORE": 40, "CAP_SYS_RESOURCE": 24}


@dataclass
class Check:
    name: str
    verdict: str  # ok | warn | fail | info
    detail: str
    fix: str | None = None


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    flows: dict[str, str] = field(default_factory=dict)  # flow -> "available" or the reason not

    @property
    def ready(self) -> bool:
        """True when no check failed: dump and restore can work."""
        return not any(c.verdict == "fail" for c in self.checks)

    def add(self, name: str, verdict: str, detail: str, fix: str | None = None) -> Check:
        """Record one check."""
        check = Check(name, verdict, detail, fix)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, object]:
        """The diagnosis as a JSON-serialisable dict."""
        return {"ready": self.ready, "checks": [asdict(c) for c in self.checks], "flows": self.flows}

    def render(self) -> str:
        """The diagnosis as text for a terminal."""
        lines = []
        for c in self.checks:
            lines.append(f"[{c.verdict:^4}] {c.name:<22} {c.detail}")
            if c.fix and c.verdict != "ok":
                lines.append(f"{'':7}{'':<22} fix: {c.fix}")
        lines.append("")
        lines.append("flows:")
        for flow, status in self.flows.items():
            lines.append(f"  {flow:<22} {status}")
        lines.append("")
        lines.append("ready: dump and restore can work here" if self.ready
                     else "NOT ready: fix the failed checks above")
        return "\n".join(lines)


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _loaded_libcriu() -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libcriu.so" in line:
            return line.split()[-1]
    return None


def _shadowing_modules() -> list[str]:
    """Other importable modules named ``pycriu`` (CRIU's own Python module is also so named)."""
    ours = Path(__file__).resolve().parent
    others = []
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec("pycriu", [entry or "."])
        if spec is None or not spec.origin:
            continue
        where = Path(spec.origin).resolve().parent
        if where != ours:
            others.append(str(where))
    return others


def diagnose(binary: str | None = None) -> Diagnosis:
    """Run every check; never raises for a failed check."""
    d = Diagnosis()
    d.add("kernel", "info", f"{platform.release()} ({platform.machine()})")

    is_root = os.geteuid() == 0
    caps = _effective_caps()
    missing = [n for n in ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_CHECKPOINT_RESTORE") if not caps >> _CAPS[n] & 1]
    if is_root and not missing:
        d.add("root", "ok", "running as root with the checkpoint/restore capabilities")
    else:
        d.add("root", "fail", f"uid {os.geteuid()}, missing {', '.join(missing) or 'root'}",
              "run as root (sudo pycriu ...) with CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE")
    if not caps >> _CAPS["CAP_SYS_RESOURCE"] & 1:
        d.add("CAP_SYS_RESOURCE", "warn", "missing: CRIU cannot raise its own limits (pipe sizes, RLIMIT_NOFILE)",
              "harmless if fs.pipe-max-size >= 4194304 (see below)")

    compiled = ".".join(map(str, _raw.COMPILED_VERSION))
    d.add("libcriu (built)", "ok" if _raw.COMPILED_VERSION >= MIN_CRIU_VERSION else "fail",
          f"extension compiled against libcriu {compiled}, loaded from {_loaded_libcriu() or '?'}",
          "reinstall pycriu against libcriu >= 3.17, best 4.2 (pip install --force-reinstall --no-binary pycriu "
          "pycriu; in a checkout: scripts/provision.sh)")
    if _raw.MISSING_SETTERS or not _raw.HAS_NETWORK_LOCK_SKIP:
        lacks = [*(f"criu_local_{name} ({version})" for name, version in _raw.MISSING_SETTERS.items()),
                 *([] if _raw.HAS_NETWORK_LOCK_SKIP else ["network-lock skip (4.2)"])]
        d.add("libcriu features", "warn", f"libcriu {compiled} lacks {', '.join(lacks)}: those options are refused",
              "build pycriu against CRIU 4.2 (scripts/provision.sh) to have them")

    others = _shadowing_modules()
    if others:
        # CRIU's own module (crit's) is also named pycriu; pycriu.images offers its load/dump/info, so
        # crit and scripts written for it work with this one: nothing needs uninstalling
        d.add("module shadowing", "info", f"pycriu imported from {Path(__file__).resolve().parent}; also on "
              f"sys.path: {', '.join(others)} (CRIU's module? crit works with either: pycriu.images)")
    else:
        d.add("module shadowing", "ok", f"pycriu imported from {Path(__file__).resolve().parent}")

    criu: Criu | None = None
    try:
        criu = Criu(binary)
    except CriuError as exc:
        d.add("criu binary", "fail", exc.message, exc.hint)
    features = None
    check_ok = False
    if criu is not None:
        try:
            version = criu.version()
            ok = version >= required_version()
            d.add("criu binary", "ok" if ok else "fail", f"{criu.binary} (CRIU {version})",
                  None if ok else INSTALL_CRIU)
        except CriuError as exc:
            d.add("criu binary", "fail", f"{criu.binary}: {exc.message}", exc.hint)
        if is_root:
            try:
                check_ok = criu.check()
                d.add("criu check", "ok", "checkpoint/restore works on this kernel")
            except CriuError as exc:
                d.add("criu check", "fail", exc.criu_message or exc.message,
                      exc.hint or f"read {exc.log_path}")
            try:
                features = criu.features()
                for name, value in (("mem_track", features.mem_track), ("lazy_pages", features.lazy_pages),
                                    ("pidfd_store", features.pidfd_store)):
                    fix = {"mem_track": "needs a kernel with CONFIG_MEM_SOFT_DIRTY (only pre-copy/hybrid use it)",
                           "lazy_pages": "needs userfaultfd (CONFIG_USERFAULTFD, /dev/userfaultfd)",
                           "pidfd_store": "needs pidfd_open/pidfd_getfd (Linux >= 5.6)"}[name]
                    d.add(f"feature {name}", "ok" if value else "warn", "supported" if value else "not supported", fix)
            except CriuError as exc:
                d.add("features", "fail", exc.message, exc.hint)
        else:
            d.add("criu check", "fail", "skipped: needs root", "run pycriu doctor as root")

    if criu is not None:
        cache = kdat.status(criu.binary)
        d.add("criu kdat cache", "ok" if cache != "cold" else "info",
              {"native": "/run is a tmpfs: CRIU keeps its kernel-probe cache (/run/criu.kdat) itself",
               "warm": "pycriu keeps CRIU's kernel-probe cache warm (/run/criu.kdat, bind-mounted from /dev/shm)",
               "cold": "every CRIU process probes the kernel first (/run is not a tmpfs: CRIU keeps no cache)"}[cache],
              "a migration's checks set it up (pycriu.kdat.ensure): 20-30 ms less in each restore"
              + ("" if kdat.enabled() else "; turned off by PYCRIU_KDAT")
              + (". PYCRIU_KDAT=off turns it off, `pycriu doctor --undo-kdat` removes it" if cache == "warm" else ""))

    pipe_max = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    pipe_ok = pipe_max >= PIPE_MAX_NEEDED
    d.add("fs.pipe-max-size", "ok" if pipe_ok else "warn", f"{pipe_max} bytes",
          f"sysctl -w fs.pipe-max-size={PIPE_MAX_NEEDED} (CRIU's lazy page server uses 4 MiB pipes)")
    uffd = Path("/dev/userfaultfd").exists()
    d.add("userfaultfd", "ok" if uffd else "info", "/dev/userfaultfd present" if uffd else "/dev/userfaultfd absent",
          "lazy migration falls back to the userfaultfd syscall; check vm.unprivileged_userfaultfd")

    # every flow's availability, from its own description (pycriu.migration.modes.FLOWS)
    from .migration.modes import FLOWS

    failed = None if check_ok else "unavailable: criu check failed"
    no_lazy = ("unavailable: no lazy pages (userfaultfd)" if features is not None and not features.lazy_pages
               else f"unavailable: fs.pipe-max-size {pipe_max} < {PIPE_MAX_NEEDED}" if not pipe_ok else None)
    no_track = (None if features is not None and features.mem_track
                else "unavailable: kernel has no dirty-memory tracking (CONFIG_MEM_SOFT_DIRTY)")
    for name, flow in FLOWS.items():
        why = failed or (flow.needs_lazy_pages and no_lazy) or (flow.needs_mem_track and no_track) or None
        d.flows[name] = why or "available"
    return d


def main(binary: str | None = None, as_json: bool = False) -> int:
    """Print the diagnosis; exit status 0 only when dump and restore can work."""
    diagnosis = diagnose(binary)
    print(json.dumps(diagnosis.to_dict(), indent=2) if as_json else diagnosis.render())
    return 0 if diagnosis.ready else 1
