"""``ContainerOptions`` without root: every option a runtime passes reaches CRIU (the setter or
config line each becomes), the wire form round-trips and refuses this process's fds by name, the
remap rewrites exactly what names the source host, and the agent accepts exactly what is safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pycriu import CgroupRoot, InheritFd, InvalidOptionError, JoinNamespace, Namespace, VethPair
from pycriu.containers import ContainerMount, ContainerOptions, ExternalNamespace, RuncBundle, RuncTarget
from pycriu.containers.runc import _restore_flags
from pycriu.migration import Migration
from pycriu.migration.containers import accept, preflight_resources
from pycriu.migration.errors import AgentError
from pycriu.migration.procs import TreeResources


def full(tmp_path: Path) -> ContainerOptions:
    """Every field set."""
    ns = tmp_path / "netns"
    ns.write_text("")
    return ContainerOptions(
        root=str(tmp_path / "rootfs"), mounts=(ContainerMount("/data", "/srv/shared"),
                                               ContainerMount("/proc/kcore", "/dev/null", key="/dev/null")),
        external=("tty[8800:3]:tty1",), namespaces=(ExternalNamespace("net", str(ns)),),
        join_ns=(JoinNamespace("uts", "/proc/1/ns/uts"),), empty_ns=Namespace.NET,
        veth_pairs=(VethPair("eth0", "veth-ct"),), manage_cgroups=True, cgroup_mode="soft",
        cgroup_roots=(CgroupRoot("/ct1", "memory"),), cgroup_yard="/run/yard",
        freeze_cgroup="/sys/fs/cgroup/freezer/ct1",
        network_lock="nftables", tcp_established=True, tcp_close=False, file_locks=True, shell_job=True,
        ext_unix_sk=True, orphan_pts_master=True, evasive_devices=True, link_remap=True, weak_sysctls=True,
        skip_file_rwx_check=True, auto_dedup=True, lsm_profile="apparmor:ct", lsm_mount_context="system_u:ctx",
        stdio=("/dev/null", "pipe:[42]", "/dev/null"), restore_sibling=False)


def test_every_option_reaches_criu_on_dump(tmp_path: Path) -> None:
    dump = full(tmp_path).dump_options(pid=1, images_dir=tmp_path)
    calls = dump.setter_calls()
    names = {name for name, _ in calls}
    assert {"set_root", "add_ext_mount", "add_external", "set_manage_cgroups", "set_manage_cgroups_mode",
            "add_cg_yard", "set_freeze_cgroup", "set_network_lock", "set_tcp_established", "set_file_locks",
            "set_shell_job", "set_ext_unix_sk", "set_orphan_pts_master", "set_evasive_devices", "set_link_remap",
            "set_skip_file_rwx_check", "set_auto_dedup", "set_tcp_close"} <= names
    assert ("add_ext_mount", ("/data", "/data")) in calls and ("add_ext_mount", ("/proc/kcore", "/dev/null")) in calls
    inode = (tmp_path / "netns").stat().st_ino
    assert ("add_external", (f"net[{inode}]:extRootNetNS",)) in calls
    assert ("add_external", ("tty[8800:3]:tty1",)) in calls


def test_every_option_reaches_criu_on_restore(tmp_path: Path) -> None:
    with full(tmp_path).restore_options(images_dir=tmp_path, stdio=(0, 7, 2)) as restore:
        calls = restore.setter_calls()
        fds = {key: fd for (name, (fd, key)) in [c for c in calls if c[0] == "add_inherit_fd"]}
    names = {name for name, _ in calls}
    assert {"set_root", "add_ext_mount", "join_ns_add", "set_empty_ns", "add_veth_pair", "add_cg_root",
            "add_cg_yard", "set_manage_cgroups_mode", "set_network_lock", "set_lsm_profile",
            "set_lsm_mount_context", "set_weak_sysctls", "add_inherit_fd", "set_orphan_pts_master"} <= names
    assert ("add_ext_mount", ("/data", "/srv/shared")) in calls
    assert ("add_ext_mount", ("/dev/null", "/dev/null")) in calls  # one per key
    assert fds["pipe:[42]"] == 7 and "extRootNetNS" in fds  # the stdio pipe and the opened namespace
    assert ("add_veth_pair", ("eth0", "veth-ct")) in calls and ("add_cg_root", ("memory", "/ct1")) in calls


def test_a_stdio_pipe_needs_a_new_end(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"fd 1 of the container was pipe:\[42\]"):
        with full(tmp_path).restore_options(images_dir=tmp_path):
            pass


def test_wire_form_round_trips(tmp_path: Path) -> None:
    options = full(tmp_path)
    assert ContainerOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_fds_of_this_process_never_cross() -> None:
    options = ContainerOptions(inherit_fds=(InheritFd(3, "pipe:[1]"),))
    with pytest.raises(InvalidOptionError, match="inherit_fds are fds of this process"):
        options.to_dict()
    with pytest.raises(InvalidOptionError, match="inherit_fds are fds of this process"):
        Migration(1, "local", container=options)


def test_bad_input_is_named() -> None:
    with pytest.raises(InvalidOptionError, match="unknown field.*'rootfs'"):
        ContainerOptions.from_dict({"rootfs": "/x"})
    with pytest.raises(InvalidOptionError, match="cgroup_mode"):
        ContainerOptions(cgroup_mode="loose")
    with pytest.raises(InvalidOptionError, match="key '/dev/null' is given two sources"):
        ContainerOptions(mounts=(ContainerMount("/a", "/dev/null", key="/dev/null"),
                                 ContainerMount("/b", "/dev/zero", key="/dev/null")))
    with pytest.raises(InvalidOptionError, match="empty_ns"):
        ContainerOptions(empty_ns=Namespace.PID)
    with pytest.raises(InvalidOptionError, match="contradicts the container's root"):
        ContainerOptions(root="/a").dump_options(pid=1, images_dir="/tmp", root="/b")
    with pytest.raises(InvalidOptionError, match="contradicts the container's tcp_established"):
        Migration(1, "local", container=ContainerOptions(tcp_established=False), flags={"tcp_established": True})


def test_remap_rewrites_what_names_the_host(tmp_path: Path) -> None:
    options = full(tmp_path)
    moved = options.remap(paths={str(tmp_path): "/dst/ct", "/srv": "/data/srv", "/srv/shared": "/mnt/shared"},
                          cgroups={"/": "/pods/a"}, interfaces={"veth-ct": "veth-dst"})
    assert moved.root == "/dst/ct/rootfs"
    assert moved.mounts[0] == ContainerMount("/data", "/mnt/shared")  # the longest prefix wins
    assert moved.mounts[1].source == "/dev/null"  # not under any prefix: unchanged
    assert moved.namespaces[0].path == "/dst/ct/netns" and moved.namespaces[0].key == "extRootNetNS"
    assert moved.cgroup_roots == (CgroupRoot("/pods/a/ct1", "memory"),)
    assert moved.veth_pairs == (VethPair("eth0", "veth-dst"),)
    assert [m.dump() for m in moved.mounts] == [m.dump() for m in options.mounts]  # what the images hold
    assert ContainerOptions(root="/srcfoo/x").remap(paths={"/src": "/d"}).root == "/srcfoo/x"  # whole components


def test_runc_restore_flags_and_config_lines() -> None:
    flags, config = _restore_flags(ContainerOptions(
        tcp_established=True, ext_unix_sk=True, shell_job=True, file_locks=True, auto_dedup=True, cgroup_mode="full",
        empty_ns=Namespace.NET, lsm_profile="p", lsm_mount_context="c", tcp_close=True, network_lock="skip",
        link_remap=True, cgroup_yard="/y", veth_pairs=(VethPair("eth0", "v0"),)))
    assert flags == ["--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks", "--auto-dedup",
                     "--manage-cgroups-mode", "full", "--empty-ns", "network", "--lsm-profile", "p",
                     "--lsm-mount-context", "c"]
    assert config == [("tcp-close", None), ("link-remap", None), ("network-lock", "skip"), ("cgroup-yard", "/y"),
                      ("veth-pair", "eth0=v0")]
    assert _restore_flags(ContainerOptions(cgroup_mode="ignore"))[1] == [("manage-cgroups", "ignore")]


def _accept(options: ContainerOptions, tmp_path: Path, *, target: RuncTarget | None = None, **kw):  # type: ignore[no-untyped-def]
    field = {"options": options.to_dict(), "runtime": target.to_dict() if target else None}
    return accept(field, paths=kw.get("paths", [tmp_path]), cgroups=kw.get("cgroups", ["/pods"]),
                  interfaces=kw.get("interfaces", ["veth-ok"]), runc_binary=kw.get("runc"), criu_binary=None)


def test_agent_accepts_what_is_safe(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    options = ContainerOptions(root=str(tmp_path / "rootfs"), bind_root=True, tcp_established=True,
                               mounts=(ContainerMount("/dev/null", "/dev/null"),
                                       ContainerMount("/sys/fs/cgroup/pids", "/sys/fs/cgroup")),
                               cgroup_roots=(CgroupRoot("/pods/ct"),), veth_pairs=(VethPair("eth0", "veth-ok"),),
                               network_lock="skip", lsm_profile="unconfined")
    assert _accept(options, tmp_path).options == options


def test_agent_refuses_the_rest_by_name(tmp_path: Path) -> None:
    options = ContainerOptions(root="/etc", mounts=(ContainerMount("/data", str(tmp_path / "missing")),),
                               cgroup_roots=(CgroupRoot("/system.slice"),), veth_pairs=(VethPair("eth0", "eth1"),),
                               join_ns=(JoinNamespace("uts", "/proc/1/ns/uts"),))
    with pytest.raises(AgentError) as info:
        _accept(options, tmp_path)
    text = info.value.message
    assert "root='/etc': path outside the directories this agent allows" in text
    assert f"mounts[/data].source='{tmp_path}/missing': missing on the destination" in text
    assert "cgroup_roots[*].path='/system.slice': cgroup outside what this agent allows (/pods)" in text
    assert "veth_pairs[eth0].outside='eth1': host interface not allowed here" in text
    assert "join_ns[uts].ns_file='/proc/1/ns/uts': path outside" in text
    with pytest.raises(AgentError, match="inherit_fds: fds of the source process"):
        accept({"options": {"inherit_fds": [{"fd": 3, "key": "k"}]}, "runtime": None}, paths=[], cgroups=[],
               interfaces=[], runc_binary=None, criu_binary=None)
    with pytest.raises(AgentError, match="unknown field"):
        accept({"options": {"evil": 1}, "runtime": None}, paths=[], cgroups=[], interfaces=[], runc_binary=None,
               criu_binary=None)


def test_agent_refuses_runc_targets_outside_its_paths(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        _accept(ContainerOptions(), tmp_path, target=RuncTarget("/opt/bundle", "ct", "/run/other"), runc="runc")
    assert "runtime.bundle='/opt/bundle': path outside" in info.value.message
    assert "runtime.root='/run/other': path outside" in info.value.message


def test_bundle_names_its_missing_bind_sources(tmp_path: Path) -> None:
    spec = {"root": {"path": "rootfs"}, "mounts": [
        {"destination": "/data", "type": "bind", "source": str(tmp_path / "gone"), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind", "ro"]},
        {"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"cgroupsPath": "/pods/ct", "maskedPaths": ["/proc/kcore"],
                  "namespaces": [{"type": "network", "path": "/run/netns/ct"}, {"type": "uts"}]}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    bundle = RuncBundle(str(tmp_path))
    assert bundle.missing_sources() == [f"/data <- {tmp_path}/gone"]
    options = bundle.options()
    assert options.root == str(tmp_path / "rootfs") and options.bind_root
    assert options.cgroup_roots == (CgroupRoot("/pods/ct"),)
    assert options.namespaces == (ExternalNamespace("net", "/run/netns/ct"),)
    sources = {m.mountpoint: m.source for m in options.mounts}
    assert sources["/data"] == str(tmp_path / "gone") and sources["/etc/hosts"] == "/etc/hosts"
    assert sources["/dev/null"] == "/dev/null" and "/proc" not in sources


def test_on_one_host_a_containers_locks_and_fifos_count_as_held_names() -> None:
    """The files are the container's (left to the agent's root check), but what only one process
    on a host can hold stays: a restore next to the frozen source would block on its lock."""
    held = TreeResources(files={"/etc/x": 1}, tcp_ports={80: 1}, unix_paths={"/run/s": 1},
                         fifos={"/f": (1, "3")}, locks={"/data/lock": (2, "POSIX")})
    kept = preflight_resources(held)
    assert kept.files == {} and kept.locks == held.locks and kept.fifos == held.fifos
    assert "POSIX lock on /data/lock (pid 2)" in kept.host_names()


def test_on_a_cgroup_v2_host_the_container_s_cgroup_is_the_unified_hierarchy_s_root(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12 mounts only cgroup v2: runc's state names the container's cgroup under the key
    ``""``. It becomes a root of the cgroup2 hierarchy alone (controller ``""``, CRIU's
    ``:PATH``), which remap moves like a v1 controller's; a v1 host's controllers keep theirs."""
    from pycriu.containers import runc

    monkeypatch.setattr(runc, "_unified", lambda: True)
    monkeypatch.setattr(runc, "_cgroup_v1_mounts", lambda: [])
    monkeypatch.setattr(runc, "_mount_root", lambda mountpoint: "/")
    roots = runc._cgroup_roots({"": "/sys/fs/cgroup/ct-1"})  # noqa: SLF001 - the mapping under test
    assert roots == [CgroupRoot("/ct-1", "")]
    moved = ContainerOptions(cgroup_roots=tuple(roots)).remap(cgroups={"/ct-1": "/dst/ct-1"})
    assert moved.cgroup_roots == (CgroupRoot("/dst/ct-1", ""),)
    monkeypatch.setattr(runc, "_unified", lambda: False)
    monkeypatch.setattr(runc, "_cgroup_v1_mounts", lambda: [("/sys/fs/cgroup/pids", "/", {"pids"})])
    assert runc._cgroup_roots({"pids": "/sys/fs/cgroup/pids/ct-1", "": "/x"}) == [  # noqa: SLF001
        CgroupRoot("/ct-1", "pids")]
