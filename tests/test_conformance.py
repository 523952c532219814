"""CRIU's own zdtm tests, run through pycriu: every mode must pass what the ``criu`` CLI passes.

The programs come from the provisioned CRIU source (``scripts/zdtm.sh`` builds them into
``build/zdtm``); :mod:`pycriu.conformance` starts each as ``zdtm.py`` does, checkpoints and
restores it through the CLI, :class:`pycriu.Criu` and :class:`pycriu.Migration` (to a local agent,
in every flow this kernel allows), then lets the test check its own state. CI runs the subset
below (each a different kind of kernel state), in this host's namespaces and in new ones (zdtm's
``ns`` flavor); ``make conformance`` runs every eligible test in both.

The first tests need no root: how ``.desc`` files, their options and the verdicts are read.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FEATURES, needs_root

from pycriu import CgroupRoot
from pycriu.conformance import MODES, Flavor, HostFlavor, NsFlavor, Outcome, ZdtmTest, eligible, load_tests, run_trial
from pycriu.conformance.__main__ import worse_than_cli
from pycriu.conformance.flavor import libraries
from pycriu.conformance.suite import _as_container, _Skip, _split  # noqa: PLC2701 - the parsers are the units under test
from pycriu.containers import ContainerMount, ContainerOptions

ROOT = Path(__file__).resolve().parents[1]
ZDTM = ROOT / "build" / "zdtm"
CRIU_SOURCE = Path(os.environ.get("PYCRIU_CRIU_SRC", "/var/cache/pycriu/build/criu-4.2.1"))

#: One of each kind of state CRIU must carry: memory and threads, pipes and FIFOs, listening,
#: connected and Unix sockets, file locks, deleted and unlinked files (ghosts), signals, timers, ptys,
#: zombies, inotify, memfd, epoll, eventfd, and tasks stopped by SIGSTOP and by job control.
SUBSET = ("env00", "maps00", "pthread00", "pipe00", "fifo", "fifo_ro", "socket_listen", "socket-tcp",
          "sockets00", "sk-unix-rel", "file_locks00", "unlink_fstat00", "sigpending", "posix_timers", "pty00",
          "zombie00", "inotify00", "memfd00", "epoll", "ghost_holes00", "eventfs00", "vdso00", "stopped",
          "stopped03")

#: Kinds whose namespaces matter, in new namespaces (zdtm's ns flavor): a pid-ns init with its
#: zombies and stopped tasks, the network namespace's sockets, IPC, a pty of its own devpts, and a
#: container's mounts: bind mounts from outside, named (ContainerMount) or detected (auto_ext_mnt,
#: ext_masters), and a restore in CRIU's older mount engine (mntns_compat_mode).
NS_SUBSET = ("env00", "pipe00", "fifo", "socket_listen", "sockets00", "file_locks00", "pty00",
             "zombie00", "stopped", "posix_timers", "mnt_ext_auto", "mnt_ext_master", "mnt_ext_root",
             "pty-console")

#: Modes this host runs; lazy and page-server-on-source need userfaultfd.
HOST_MODES = tuple(m for m in MODES if FEATURES is None or FEATURES.lazy_pages
                   or m not in ("lazy", "page-server-on-source"))


# -- reading zdtm's descriptions (no root) ---------------------------------------------------------

def test_a_desc_is_read_as_zdtm_reads_it(tmp_path: Path) -> None:
    (tmp_path / "static").mkdir()
    for name, desc in (("plain", None), ("locks", "{'flags': 'suid', 'opts': '--file-locks'}"),
                       ("nsonly", "{'flavor': 'ns uns'}"), ("code", "os.getenv('X') and {'flags': 'x'}")):
        (tmp_path / "static" / f"{name}.c").write_text("")
        (tmp_path / "static" / name).write_text("")
        if desc is not None:
            (tmp_path / "static" / f"{name}.desc").write_text(desc)
    tests = {t.name: t for t in load_tests(tmp_path)}
    assert tests["plain"].flavors == ["h", "ns", "uns"] and tests["plain"].flags == []
    assert tests["locks"].opts("dump") == ["--file-locks"] and tests["locks"].flags == ["suid"]
    assert eligible(tests["nsonly"], "criu") == "flavor ns uns only (not the host flavor)"
    assert eligible(tests["nsonly"], "criu", "ns") is None
    # zdtm.py evals a few descriptions that read its environment: those run only when set up by hand
    assert tests["code"].flags == ["noauto"] and eligible(tests["code"], "criu") == "flag noauto"


def test_the_ns_flavor_names_its_root_and_dev_to_criu_as_zdtm_does(tmp_path: Path) -> None:
    flavor = NsFlavor(tmp_path)
    flavor._tmp = "/t"  # noqa: SLF001 - the paths without mounting (no root needed)
    assert flavor.dump_opts() == ["--root", "/t/root/root", "--external", "mnt[/dev]:ZDTM_DEV"]
    assert flavor.restore_opts() == ["--root", "/t/root/root", "--external", "mnt[ZDTM_DEV]:/t/dev"]
    c = flavor.container()
    assert c.dump_fields()["root"] == "/t/root/root" and c.restore_fields()["ext_mounts"][0].key == "ZDTM_DEV"
    assert flavor.env()["ZDTM_NEWNS"] == "1" and flavor.env()["ZDTM_ROOT"] == "/t/root/root"
    assert flavor.start_dir(tmp_path / "static") == Path("/t/root/root/static")


def test_a_binarys_libraries_are_what_ldd_names() -> None:
    libs = libraries(Path("/bin/sh"))
    assert any("libc.so" in lib for lib in libs) and all(lib.startswith("/") for lib in libs)
    assert not any("vdso" in lib for lib in libs)


def test_a_nolazy_test_is_not_run_with_lazy_pages(tmp_path: Path) -> None:
    test = ZdtmTest("cow00", tmp_path, {"flags": "suid nolazy"})
    for mode in ("lazy", "page-server-on-source"):
        got = run_trial(test, mode, work=tmp_path)
        assert (got.result, got.reason) == ("skipped", "flag nolazy (zdtm does not run it with lazy pages)")


def test_options_split_into_pycriu_fields_and_criu_options() -> None:
    got = _split(["--tcp-established", "--ghost-limit", "8M", "--no-ghost-fiemap", "--manage-cgroups=full",
                  "--external", "a", "--external", "b", "--timeout", "5", "--timeout", "6"])
    assert got.fields == {"tcp_established": True}
    assert got.other == {"ghost-limit": "8M", "no-ghost-fiemap": True, "manage-cgroups": "full", "timeout": "5"}
    assert got.external == ["a", "b"]  # every --external, as DumpOptions.external takes them
    assert got.rest == ["--timeout", "6"]  # criu_options holds one value per option
    roots = _split(["--cgroup-root", "/newroot", "--cgroup-root", "name=zdtmtst:/prefix"]).cgroup_roots
    assert roots == [CgroupRoot("/newroot"), CgroupRoot("/prefix", "name=zdtmtst")]


def test_a_tests_mounts_become_the_containers() -> None:
    """zdtm's external mounts, as a runtime gives them: ``mnt[PATH]:KEY`` on dump with
    ``mnt[KEY]:SOURCE`` on restore is one ContainerMount; ``mnt[]:s`` is auto-detection with
    shared propagation; what ContainerOptions cannot say is a skip with the reason."""
    base = ContainerOptions(root="/r", mounts=(ContainerMount("/dev", "/t/dev", key="ZDTM_DEV"),))
    c = _as_container(base, _split(["--external", "mnt[/x/dst]:ZDTM", "--external", "tty[1:2]"]),
                      _split(["--external", "mnt[ZDTM]:/tmp/src", "--no-mntns-compat-mode"]))
    assert c is not None and c.mounts[1] == ContainerMount("/x/dst", "/tmp/src", key="ZDTM")
    assert c.external == ("tty[1:2]",) and c.mntns_compat_mode is None and c.root == "/r"
    auto = _as_container(None, _split(["--external", "mnt[]:s"]), _split(["--external", "mnt[]:s"]))
    assert auto is not None and (auto.auto_ext_mnt, auto.ext_sharing, auto.ext_masters) == (True, True, None)
    assert auto.dump_fields()["auto_ext_mnt"] and auto.restore_fields()["ext_sharing"]
    mapped = _as_container(None, _split(["--ext-mount-map", "auto", "--enable-external-masters"]), _split([]))
    assert mapped is not None and mapped.auto_ext_mnt and mapped.ext_masters
    compat = _as_container(None, _split([]), _split(["--mntns-compat-mode"]))
    assert compat is not None and compat.restore_fields()["mntns_compat_mode"] is True
    assert "mntns_compat_mode" not in compat.dump_fields()  # CRIU refuses it on dump
    cg = _as_container(None, _split(["--manage-cgroups", "--cgroup-root", "name=z:/p"]),
                       _split(["--cgroup-root", "/new", "--cgroup-root", "name=z:/p"]))
    assert cg is not None and cg.manage_cgroups and cg.dump_cgroup_roots == (CgroupRoot("/p", "name=z"),)
    assert cg.cgroup_roots == (CgroupRoot("/new"), CgroupRoot("/p", "name=z"))
    assert cg.dump_fields()["cgroup_roots"] == cg.dump_cgroup_roots  # DumpOptions.cgroup_roots
    with pytest.raises(_Skip, match=r"has no restore mnt\[K\]:SOURCE"):
        _as_container(None, _split(["--external", "mnt[/a]:K"]), _split([]))
    with pytest.raises(_Skip, match="only 'auto'"):
        _as_container(None, _split(["--ext-mount-map", "/a:/b"]), _split([]))


def test_only_a_mode_failing_where_the_cli_passes_counts_against_pycriu() -> None:
    results = [Outcome("a", "cli", "passed", ""), Outcome("a", "classic", "failed", "x"),
               Outcome("b", "cli", "failed", "y"), Outcome("b", "classic", "failed", "y"),
               Outcome("c", "cli", "passed", ""), Outcome("c", "criu", "skipped", "z")]
    assert [(o.test, o.mode) for o in worse_than_cli(results)] == [("a", "classic")]


# -- the suite itself (root, real CRIU) -------------------------------------------------------------

@pytest.fixture(scope="module")
def zdtm() -> dict[str, ZdtmTest]:
    """The subset, built from the provisioned CRIU source (a second build only relinks)."""
    if not (CRIU_SOURCE / "test" / "zdtm" / "static").is_dir():
        pytest.skip(f"no CRIU source at {CRIU_SOURCE} (scripts/provision.sh unpacks it)")
    names = sorted({*SUBSET, *NS_SUBSET})
    subprocess.run(["bash", str(ROOT / "scripts" / "zdtm.sh"), *names], check=True, timeout=600)
    return {t.name: t for t in load_tests(ZDTM) if t.name in names}


@pytest.fixture(scope="module")
def ns_flavor(zdtm: dict[str, ZdtmTest]) -> Iterator[NsFlavor]:
    """zdtm's ns flavor: a root and a /dev of its own, unmounted at the end."""
    with NsFlavor(ZDTM) as flavor:
        yield flavor


_cli: dict[tuple[str, str], Outcome] = {}


def _compare(test: ZdtmTest | None, name: str, mode: str, flavor: Flavor, tmp_path: Path) -> None:
    """The CLI's outcome of ``name`` (once per flavor), then ``mode``'s: where the CLI passes,
    ``mode`` must pass too, and the test program itself says whether its state survived."""
    assert test is not None, f"{name} did not build (see build/zdtm/static/{name}.build.err)"
    why = eligible(test, "/usr/local/sbin/criu", flavor.name)
    if why:
        pytest.skip(f"zdtm's {name} cannot run here: {why}")
    key = (name, flavor.name)
    if key not in _cli:
        _cli[key] = run_trial(test, "cli", work=tmp_path, flavor=flavor)
    baseline = _cli[key]
    if baseline.result != "passed":
        pytest.skip(f"the criu CLI itself does not pass {name} ({flavor.name} flavor) here: {baseline.reason}")
    got = run_trial(test, mode, work=tmp_path, flavor=flavor)
    if got.result == "skipped":
        pytest.skip(f"{mode} cannot express {name}: {got.reason}")
    assert got.result == "passed", f"{name} [{mode}, {flavor.name} flavor]: {got.reason} (the CLI passes it)"


@needs_root
@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in HOST_MODES if m != "cli"])
@pytest.mark.parametrize("name", SUBSET)
def test_pycriu_passes_what_the_criu_cli_passes(zdtm: dict[str, ZdtmTest], name: str, mode: str,
                                                tmp_path: Path) -> None:
    """zdtm's test ``name`` in this host's namespaces, by the CLI and then in ``mode``."""
    _compare(zdtm.get(name), name, mode, HostFlavor(), tmp_path)


@needs_root
@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in HOST_MODES if m != "cli"])
@pytest.mark.parametrize("name", NS_SUBSET)
def test_pycriu_passes_what_the_criu_cli_passes_in_new_namespaces(zdtm: dict[str, ZdtmTest], ns_flavor: NsFlavor,
                                                                  name: str, mode: str, tmp_path: Path) -> None:
    """zdtm's ns flavor: the test in new PID, mount, network, UTS and IPC namespaces under a root
    of its own, checkpointed as a container (``--root``, ``/dev`` an external mount)."""
    _compare(zdtm.get(name), name, mode, ns_flavor, tmp_path)
