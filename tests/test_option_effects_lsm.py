"""The LSM options, shown by the effect. ``lsm_profile`` replaces, on restore, the profile each
task was dumped in: where CRIU finds an LSM that gives tasks profiles (AppArmor; SELinux, when
the criu binary is built with libselinux), the restored task runs under the one named, read back
from ``/proc/PID/attr``; elsewhere those tests skip with what the machine shows, and CRIU's
refusal of a profile for an LSM it does not find is the effect (that test runs everywhere).
``lsm_mount_context`` is the SELinux label CRIU writes into the ``context=`` option of each mount
it restores with one: CRIU's log shows it on any kernel, on a runc container whose mount image is
edited to carry a ``context=``.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from container_support import gone, needs_runc, sites  # noqa: F401 - fixture
from test_option_effects import Program, _images, _restore, program  # noqa: F401 - fixture

import pycriu
import pycriu.images
from pycriu.migration.procs import kill_tree, tree_state, wait_gone

SECURITYFS = Path("/sys/kernel/security")


def _read(path: str) -> str:
    """``path``'s text, or why it cannot be read (as the reason of a skip names it)."""
    try:
        return repr(Path(path).read_text().strip("\0\n "))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"


def _machine() -> str:
    """What this machine shows of its LSMs: the list securityfs gives, AppArmor's module, the
    SELinux file system, and what a task's profile reads as."""
    if (SECURITYFS / "lsm").exists():
        lsms = f"/sys/kernel/security/lsm lists {_read(str(SECURITYFS / 'lsm'))}"
    elif not os.path.ismount(SECURITYFS):
        lsms = "nothing is mounted on /sys/kernel/security (securityfs)"
    else:
        lsms = "/sys/kernel/security/lsm does not exist"
    apparmor = "/sys/module/apparmor does not exist" if not Path("/sys/module/apparmor").exists() else \
        f"/sys/module/apparmor/parameters/enabled is {_read('/sys/module/apparmor/parameters/enabled')}"
    selinux = "/sys/fs/selinux is mounted" if os.path.ismount("/sys/fs/selinux") else "/sys/fs/selinux is not mounted"
    return f"{lsms}; {apparmor}; {selinux}; /proc/self/attr/current {_read('/proc/self/attr/current')}"


def _why_no_apparmor() -> str | None:
    # CRIU's own test (criu/lsm.c, kerndat_lsm): AppArmor's directory in securityfs
    if not (SECURITYFS / "apparmor").exists():
        return f"CRIU finds no AppArmor here (it looks for /sys/kernel/security/apparmor): {_machine()}"
    if shutil.which("apparmor_parser") is None:
        return "AppArmor is active, but apparmor_parser (which loads the test's two profiles) is not installed"
    return None


def _why_no_selinux() -> str | None:
    if not Path("/sys/fs/selinux/enforce").exists():
        return f"SELinux is not enabled (there is no /sys/fs/selinux/enforce): {_machine()}"
    binary = shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    if binary is None or b"libselinux.so" not in Path(binary).read_bytes():
        return f"SELinux is active, but the criu binary ({binary}) is built without libselinux: it never finds SELinux"
    return None


def _apparmor_profile(pid: int) -> str:
    """The AppArmor profile task ``pid`` runs under (without its mode)."""
    path = Path(f"/proc/{pid}/attr/apparmor/current")  # the file of AppArmor's own, where LSMs stack
    return (path if path.exists() else Path(f"/proc/{pid}/attr/current")).read_text().split()[0]


def _selinux_context(pid: int) -> str:
    return Path(f"/proc/{pid}/attr/current").read_text().strip("\0\n")


def _dump(criu: pycriu.Criu, p: Program, images: Path) -> str:
    """Dump ``p`` (it ends); the LSM CRIU found, as its inventory records it."""
    criu.dump(pycriu.DumpOptions(pid=p.pid, images_dir=images))
    wait_gone(p.pid)
    return str(pycriu.images.loads((images / "inventory.img").read_bytes())["entries"][0]["lsmtype"])


def _killed(pid: int) -> None:
    kill_tree(pid)
    wait_gone(pid)


@needs_root
@pytest.mark.criu
def test_lsm_profile_is_refused_for_an_lsm_criu_does_not_find(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:  # noqa: F811
    """CRIU reads ``LSM:PROFILE`` and refuses a profile of an LSM it does not find on this host
    (on this machine neither: its inventory says NO_LSM), or one that names no LSM; without the
    option the same images restore."""
    p = program("")
    images = _images(tmp_path, "images")
    found = _dump(criu, p, images)
    refused = [lsm for lsm in ("apparmor", "selinux") if found != lsm.upper()]
    assert refused, found  # CRIU finds one LSM at most
    for profile, reason in [(f"{lsm}:pycriu-test", f"{lsm} LSM specified but {lsm} not supported by kernel")
                            for lsm in refused] + [("pycriu-test", "invalid argument pycriu-test for --lsm-profile")]:
        with pytest.raises(pycriu.RestoreError) as info:
            criu.restore(pycriu.RestoreOptions(images_dir=images, lsm_profile=profile))
        assert reason in (info.value.criu_message or ""), (profile, info.value.criu_message)
    restored = _restore(criu, p, images)
    assert tree_state(restored.pid) == "running"


@pytest.fixture
def apparmor_profiles(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two AppArmor profiles in complain mode (they deny nothing), loaded for the test."""
    names = ("pycriu-test-dumped", "pycriu-test-restored")
    policy = tmp_path / "pycriu-test.apparmor"
    policy.write_text("".join(f"profile {name} flags=(complain) {{\n}}\n" for name in names))
    subprocess.run(["apparmor_parser", "--replace", str(policy)], check=True, capture_output=True)
    try:
        yield names
    finally:
        subprocess.run(["apparmor_parser", "--remove", str(policy)], check=False, capture_output=True)


def _runs_under(criu: pycriu.Criu, p: Program, images: Path, label: Callable[[int], str], dumped: str,
                lsm_profile: str, wanted: str) -> None:
    """Restored as dumped, the task has its dumped label again; restored with ``lsm_profile``, it
    has the one named."""
    restored = _restore(criu, p, images)
    assert label(restored.pid) == dumped
    _killed(restored.pid)
    restored = _restore(criu, p, images, lsm_profile=lsm_profile)
    assert label(restored.pid) == wanted


@needs_root
@pytest.mark.criu
@pytest.mark.skipif(_why_no_apparmor() is not None, reason=_why_no_apparmor() or "")
def test_lsm_profile_is_the_apparmor_profile_the_restored_task_runs_under(
        criu: pycriu.Criu, apparmor_profiles: tuple[str, str],  # profiles outlive the tasks
        program: Callable[..., Program], tmp_path: Path) -> None:  # noqa: F811
    """The tree changes to one profile before it is dumped; restored, it runs under that one
    again, or under the other when lsm_profile names it (CRIU rewrites the dumped profile)."""
    dumped, wanted = apparmor_profiles
    p = program("for name in ('/proc/self/attr/apparmor/current', '/proc/self/attr/current'):\n"
                "    if os.path.exists(name):\n"
                f"        pathlib.Path(name).write_text('changeprofile {dumped}')\n"
                "        break")
    assert _apparmor_profile(p.pid) == dumped
    images = _images(tmp_path, "images")
    assert _dump(criu, p, images) == "APPARMOR"
    _runs_under(criu, p, images, _apparmor_profile, dumped, f"apparmor:{wanted}", wanted)


@needs_root
@pytest.mark.criu
@pytest.mark.skipif(_why_no_selinux() is not None, reason=_why_no_selinux() or "")
def test_lsm_profile_is_the_selinux_context_the_restored_task_runs_under(
        criu: pycriu.Criu, program: Callable[..., Program], tmp_path: Path) -> None:  # noqa: F811
    """The tree runs in this process's context; restored, it runs in that one again, or in the
    one lsm_profile names: the same context narrowed to the low level of its MLS range."""
    ours = _selinux_context(os.getpid())
    user, role, kind, *level = ours.split(":", 3)
    if not level or "-" not in level[0]:
        pytest.skip(f"this process's SELinux context {ours!r} has no MLS range to narrow for the restored task")
    wanted = f"{user}:{role}:{kind}:{level[0].split('-')[0]}"
    p = program("")
    images = _images(tmp_path, "images")
    assert _dump(criu, p, images) == "SELINUX"
    _runs_under(criu, p, images, _selinux_context, ours, f"selinux:{wanted}", wanted)


@needs_runc
@pytest.mark.containers
def test_lsm_mount_context_is_the_selinux_context_criu_gives_the_mounts_it_restores(
        sites, tmp_path: Path, criu: pycriu.Criu) -> None:  # noqa: F811
    """A runc container's checkpoint, its /dev/shm mount edited to carry the ``context=`` option
    an SELinux-labelled container's has. CRIU replaces that option's value with lsm_mount_context
    before it mounts (its log says so, on any kernel); without the option it mounts with the
    dumped one. Both labels are of types no policy has, so both mounts fail, on every kernel."""
    source, _ = sites
    ct = source.run(source.ids[0])
    options = ct.options()
    images = tmp_path / "images"
    ct.checkpoint(images)
    [mounts_img] = images.glob("mountpoints-*.img")
    mounts = pycriu.images.loads(mounts_img.read_bytes())
    shm = next(m for m in mounts["entries"] if m["mountpoint"].removeprefix(".") == "/dev/shm")
    shm["options"] = 'context="system_u:object_r:pycriu_dumped_t:s0",' + shm["options"]
    mounts_img.write_bytes(pycriu.images.dumps(mounts))
    given = "system_u:object_r:pycriu_restored_t:s0"
    logs = {}
    for name, extra in (("dumped", {}), ("given", {"lsm_mount_context": given})):
        with options.restore_options(images_dir=images, work_dir=tmp_path, log_file=f"{name}.log",
                                     log_level=pycriu.LogLevel.DEBUG, **extra) as opts:
            try:
                result = criu.restore(opts)
            except pycriu.RestoreError as exc:
                assert "Unable to mount shm " in (exc.criu_message or ""), (name, exc.criu_message)
            else:
                os.kill(result.pid, signal.SIGKILL)
                gone(result.pid)
                raise AssertionError(f"{name}: the mount with an unknown SELinux type succeeded")
        logs[name] = (tmp_path / f"{name}.log").read_text()
    assert f"Changed mount 'context=' to context=\"{given}\",{shm['options'].split(',', 1)[1]}" in logs["given"]
    assert "Changed mount 'context='" not in logs["dumped"]
