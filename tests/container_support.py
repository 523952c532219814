"""Real runc containers for the tests: a busybox rootfs bundle made with ``runc spec`` in a
temporary directory, a workload that keeps changing state, and a fixture that always removes
the containers, their cgroups and the derived bundles.

The workload (PID, mount, network, UTS and IPC namespaces of its own, a read-write rootfs, a
bind mount ``/data`` from the host, stdio on ``/dev/null``) fills a shell variable with 192 KiB
of random data, writes its md5 to ``/sum0`` once, then every 50 ms counts up in ``/counter`` and
writes the md5 of the variable again to ``/sum`` (each file replaced whole): a restored copy whose memory was damaged
writes another sum, and one that did not go on stops counting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pycriu.containers import Runc, RuncContainer
from pycriu.migration.phases import Progress

BUSYBOX = shutil.which("busybox", path="/bin:/usr/bin:/usr/local/bin")
RUNC = shutil.which("runc")
_APPLETS = ("sh", "sleep", "head", "base64", "md5sum", "cat", "echo", "mv")

# Each file is replaced whole (mv), so that a reader never sees one half written. A file the
# tree holds open at the freeze must exist in the destination's rootfs, a copy made before the
# freeze ("Can't open file sum.new on restore"): the rootfs files are opened only by the shell's
# own echo (microseconds), never while md5sum runs (milliseconds), whose output goes to a pipe.
WORKLOAD = ('D=$(head -c 196608 /dev/urandom | base64); S=$(printf %s "$D" | md5sum); echo "$S" > /sum0.new; '
            'mv /sum0.new /sum0; i=0; while :; do i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter; '
            'S=$(printf %s "$D" | md5sum); echo "$S" > /sum.new; mv /sum.new /sum; sleep 0.05; done')


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "not root: runc and CRIU need CAP_SYS_ADMIN"
    if RUNC is None:
        return "runc is not installed (scripts/provision.sh installs Debian's runc)"
    if BUSYBOX is None or b"ld-linux" in Path(BUSYBOX).read_bytes()[:8192]:
        return "a static busybox is not installed (scripts/provision.sh installs busybox-static)"
    return None


#: every container test: runc, a static busybox, root
needs_runc = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def make_bundle(bundle: Path, shared: Path, *, cgroups_path: str | None = None) -> Path:
    """An OCI bundle at ``bundle`` (``runc spec``) over a busybox rootfs, running
    :data:`WORKLOAD` with ``shared`` bound on ``/data``."""
    assert BUSYBOX is not None and RUNC is not None
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc", "data"):
        (rootfs / d).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in _APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    subprocess.run([RUNC, "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", WORKLOAD]
    spec["root"]["readonly"] = False
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "rw"]})
    if cgroups_path is not None:
        spec["linux"]["cgroupsPath"] = cgroups_path
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    shared.mkdir(exist_ok=True)
    return bundle


def copy_bundle(source: Path, bundle: Path, shared: Path, *, cgroups_path: str) -> Path:
    """The "destination host's" copy of a bundle: its own rootfs (copied before the freeze),
    its own bind-mount source, its own cgroup."""
    shutil.copytree(source, bundle, symlinks=True, copy_function=_copy_unless_gone)
    shutil.copytree(Path(_spec(source)["mounts"][-1]["source"]), shared, copy_function=_copy_unless_gone)
    spec = _spec(bundle)
    spec["mounts"][-1]["source"] = str(shared)
    spec["linux"]["cgroupsPath"] = cgroups_path
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle


def _copy_unless_gone(src: str, dst: str) -> None:
    """``shutil.copy2``, except that a file the running workload renamed away between the
    listing and the copy (``/sum.new``, ``/counter.new``) is skipped: the copy is of a live
    rootfs, as a runtime's pre-copy of a rootfs is."""
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        if os.path.lexists(src):
            raise


def final_sync(source: Path, bundle: Path) -> Callable[[Progress], None]:
    """A migration's progress callback that, when the restore starts (the source is frozen or
    gone: its rootfs holds still), copies the source's rootfs files to the destination's again,
    as a runtime's last sync of a live-copied rootfs does: a file the tree had open at the freeze
    (``/sum.new``, held by the shell's echo for a moment) then exists there too."""
    def sync(e: Progress) -> None:
        if e.phase == "restore" and e.event == "start":
            src, dst = source / "rootfs", bundle / "rootfs"
            for f in src.iterdir():
                if f.is_file() and not f.is_symlink():
                    _copy_unless_gone(str(f), str(dst / f.name))
    return sync


def _spec(bundle: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((bundle / "config.json").read_text())


@dataclass
class Site:
    """One "host" of a test: its runc state directory, bundle and bind-mount source."""

    root: Path
    runc: Runc
    bundle: Path
    shared: Path
    ids: list[str] = field(default_factory=list)

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def counter(self) -> int:
        try:
            return int((self.rootfs / "counter").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def sums(self) -> tuple[str, str]:
        return (self.rootfs / "sum0").read_text(), (self.rootfs / "sum").read_text()

    def wait_counting(self, above: int = 0, timeout: float = 10.0) -> int:
        """Wait until the container's counter passes ``above`` and moves once more (it runs, it
        did not just run); return the value."""
        deadline = time.monotonic() + timeout
        first: int | None = None
        while time.monotonic() < deadline:
            now = self.counter()
            if now > above:
                if first is None:
                    first = now
                elif now > first:
                    return now
            time.sleep(0.03)
        raise AssertionError(f"the counter in {self.rootfs} did not go on past {above} (now {self.counter()})")

    def run(self, container_id: str) -> RuncContainer:
        self.ids.append(container_id)
        self.runc.run("run", "--detach", "--bundle", str(self.bundle), container_id, log=self.root / "run.log")
        ct = RuncContainer(container_id, self.runc)
        self.wait_counting()
        return ct

    def running(self) -> list[str]:
        return [c["id"] for c in self.runc.containers() if c["status"] == "running"]

    def cleanup(self) -> None:
        for container_id in self.ids:
            subprocess.run([*self.runc.argv("delete", "--force", container_id)], capture_output=True, check=False)
            shutil.rmtree(self.runc.derived_bundle_dir(container_id), ignore_errors=True)


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    """A source and a "destination" on this host: two runc state directories, two bundles (the
    destination's a copy with its own cgroup and bind-mount source). Containers made through
    them are force-deleted at the end, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    src_root = tmp_path / "src"
    src_root.mkdir()
    bundle = make_bundle(src_root / "bundle", src_root / "shared")
    dst_root = tmp_path / "dst"
    dst_root.mkdir()
    criu = shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    source = Site(src_root, Runc(root=str(src_root / "runc"), criu=criu), bundle, src_root / "shared")
    dest = Site(dst_root, Runc(root=str(dst_root / "runc"), criu=criu),
                dst_root / "bundle", dst_root / "shared")
    dest_cgroup = f"/pycriu-test-{tag}"
    source.ids.append(f"ct-{tag}")
    dest.ids.append(f"ct-{tag}")
    try:
        yield source, dest
    finally:
        source.cleanup()
        dest.cleanup()
        _remove_cgroups(dest_cgroup)
        _remove_cgroups(f"ct-{tag}")  # what a restore by pycriu itself (not runc's) left


def dest_cgroup_of(dest: Site) -> str:
    return f"/pycriu-test-{dest.ids[0].removeprefix('ct-')}"


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists (reaped first: this test process is the child subreaper
    that a detached container's init is re-parented to)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not os.path.exists(f"/proc/{pid}")


def _remove_cgroups(path: str) -> None:
    """Remove the cgroup ``path`` (absolute, or relative to this process's own cgroup, as runc
    places a container without cgroupsPath) from every hierarchy (v1's, and a v2 host's one),
    children first."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, where = line.split(":", 2)
        for name in names.split(","):
            own[name.removeprefix("name=")] = where
    top = Path("/sys/fs/cgroup")  # the cgroup v2 hierarchy itself on a v2 host (name "")
    for hierarchy in [top, *top.iterdir()]:
        base = own.get("" if hierarchy == top else hierarchy.name, "/") if not path.startswith("/") else "/"
        target = hierarchy / base.lstrip("/") / path.lstrip("/")
        if not target.is_dir():
            continue
        for sub in sorted((d for d in target.rglob("*") if d.is_dir()), reverse=True):
            sub.rmdir()
        try:
            target.rmdir()
        except OSError:
            pass
