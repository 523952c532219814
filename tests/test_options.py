"""Option objects: every value is checked when the object is built, and only what was set is sent.

Options are tri-state like CRIU's: ``None`` means "not set" and is never sent (CRIU's default
applies), which is not the same as ``False``. A field reaches CRIU through a libcriu setter or,
when libcriu has none, through a private CRIU config file; values for the config file are limited
to characters CRIU's parser keeps verbatim, so no value can inject another option.

No root needed: nothing here runs CRIU (libcriu setters are applied to a ``criu_opts`` only).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import pycriu
from pycriu import _config, _raw
from pycriu.enums import CgroupMode, LogLevel, Namespace, NetworkLockMethod
from pycriu.options import _Via

D = pycriu.DumpOptions
R = pycriu.RestoreOptions


def via(cls: type, name: str) -> _Via:
    return next(f.metadata["via"] for f in dataclasses.fields(cls) if f.name == name)


def fields_of_kind(cls: type, kind: str, *, channel: str) -> list[str]:
    """Names of ``cls``'s fields of ``kind`` that reach CRIU through ``channel`` (setter/config)."""
    names = []
    for f in dataclasses.fields(cls):
        v = f.metadata.get("via")
        if v is not None and v.kind == kind and getattr(v, channel) is not None:
            names.append(f.name)
    return names


# --- Tri-state: unset is never sent -------------------------------------------------------------


def test_an_option_object_with_nothing_set_sends_only_the_pid() -> None:
    opts = D(pid=42, images_dir="/srv/ckpt")
    assert opts.setter_calls() == [("set_pid", (42,))]
    assert opts.config_entries() == []


def test_restore_options_with_nothing_set_send_nothing() -> None:
    opts = R(images_dir="/srv/ckpt")
    assert opts.setter_calls() == []
    assert opts.config_entries() == []


@pytest.mark.parametrize("name", fields_of_kind(D, "bool", channel="setter"))
def test_false_is_sent_as_false_and_none_is_not_sent(name: str) -> None:
    setter = via(D, name).setter
    assert (setter, (False,)) in D(pid=1, images_dir="/d", **{name: False}).setter_calls()
    assert (setter, (True,)) in D(pid=1, images_dir="/d", **{name: True}).setter_calls()
    assert all(call[0] != setter for call in D(pid=1, images_dir="/d").setter_calls())


def test_lists_become_one_setter_call_per_item_in_order() -> None:
    opts = D(pid=1, images_dir="/d", external=["mnt[/a]:a", "mnt[/b]:b"], unix_sk_inodes=[7, 8])
    calls = opts.setter_calls()
    assert [c for c in calls if c[0] == "add_external"] == [("add_external", ("mnt[/a]:a",)),
                                                         ("add_external", ("mnt[/b]:b",))]
    assert [c for c in calls if c[0] == "add_unix_sk"] == [("add_unix_sk", (7,)), ("add_unix_sk", (8,))]
    assert opts.external == ("mnt[/a]:a", "mnt[/b]:b")  # normalised to an immutable tuple


def test_every_setter_exists_in_libcriu_and_accepts_a_valid_value() -> None:
    """Build options with every setter-bound field set, and apply all of them to a real
    ``criu_opts``: each name is a real ``criu_local_*`` function and libcriu accepts the value
    (a build against an older libcriu refuses what that one lacks, naming the version)."""
    samples: dict[str, Any] = {"bool": True, "uint": 5, "int": 5, "str": "x", "path": "/tmp",
                               "strs": ["a"], "paths": ["/a"], "ints": [1]}
    specials: dict[type, dict[str, Any]] = {
        D: {"pid": 1, "page_server": pycriu.PageServerAddress("127.0.0.1", 27000), "pidfd_store_sk": 0,
            "cgroup_roots": [pycriu.CgroupRoot("/x", "cpu"), pycriu.CgroupRoot("/y")]},
        R: {"inherit_fds": [pycriu.InheritFd(0, "pipe:[1]")], "veth_pairs": [pycriu.VethPair("eth0", "veth0")],
            # Optional strings left None reach libcriu as NULL ("all controllers", "no extra").
            "cgroup_roots": [pycriu.CgroupRoot("/x", "cpu"), pycriu.CgroupRoot("/y")],
            "join_ns": [pycriu.JoinNamespace("net", "/proc/1/ns/net"),
                        pycriu.JoinNamespace("uts", "/proc/1/ns/uts", "extra")],
            "empty_ns": Namespace.NET, "exec_cmd": ["/bin/true", "arg"],
            "ext_mounts": [pycriu.ExternalMount("/mnt", "ext")]},
    }
    for cls in (D, R):
        kw = dict(specials[cls])
        for f in dataclasses.fields(cls):
            v = f.metadata.get("via")
            if v is not None and v.setter is not None:
                kw[f.name] = next(iter(v.enum)) if v.kind == "enum" else samples[v.kind]
        calls = cls(images_dir="/tmp", **kw).setter_calls()
        assert len(calls) >= len(kw)
        with _raw.RawOpts() as raw:
            for setter, args in calls:
                if setter in _raw.MISSING_SETTERS:  # built against an older libcriu: refused by name
                    with pytest.raises(pycriu.CriuVersionError, match=f"criu_local_{setter} needs libcriu"):
                        raw.apply(setter, *args)
                    continue
                raw.apply(setter, *args)


# --- Types and ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize("pid", [0, -1, True, "1", 1.0, None])
def test_pid_must_be_a_positive_int(pid: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="pid"):
        D(pid=pid, images_dir="/d")  # type: ignore[arg-type]


@pytest.mark.parametrize("images_dir", ["", 42, "/a\0b", None])
def test_images_dir_must_be_a_path(images_dir: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="images_dir"):
        R(images_dir=images_dir)  # type: ignore[arg-type]


def test_paths_are_normalised_to_str(tmp_path: Path) -> None:
    opts = D(pid=1, images_dir=tmp_path, work_dir=tmp_path / "w", root=tmp_path)
    assert opts.images_dir == str(tmp_path)
    assert opts.work_dir == str(tmp_path / "w")
    assert ("set_root", (str(tmp_path),)) in opts.setter_calls()
    assert opts.log_path == tmp_path / "w" / "dump.log"
    assert R(images_dir=tmp_path, log_file="r.log").log_path == tmp_path / "r.log"


@pytest.mark.parametrize("value", [1, 0, "yes", "true", None.__class__])
def test_bool_options_take_only_bools(value: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="shell_job"):
        D(pid=1, images_dir="/d", shell_job=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "ok"), [(0, True), (2**32 - 1, True), (-1, False), (2**32, False),
                                           (True, False), ("5", False), (1.5, False)])
def test_unsigned_options_take_32_bit_unsigned_ints(value: object, ok: bool) -> None:
    if ok:
        opts = D(pid=1, images_dir="/d", ghost_limit=value)  # type: ignore[arg-type]
        assert ("set_ghost_limit", (value,)) in opts.setter_calls()
        # timeout goes by CRIU's config file (libcriu's setter never reaches CRIU)
        assert ("timeout", str(value)) in D(pid=1, images_dir="/d", timeout=value).config_entries()  # type: ignore[arg-type]
    else:
        with pytest.raises(pycriu.InvalidOptionError, match="timeout"):
            D(pid=1, images_dir="/d", timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["debug", "DEBUG", "Debug", LogLevel.DEBUG, int(LogLevel.DEBUG)])
def test_enum_options_take_names_members_or_values(value: object) -> None:
    opts = D(pid=1, images_dir="/d", log_level=value)  # type: ignore[arg-type]
    assert opts.log_level is LogLevel.DEBUG
    assert ("set_log_level", (int(LogLevel.DEBUG),)) in opts.setter_calls()


def test_other_enums_by_name() -> None:
    opts = D(pid=1, images_dir="/d", network_lock="nftables", cgroup_mode="soft")
    assert opts.network_lock is NetworkLockMethod.NFTABLES
    assert opts.cgroup_mode is CgroupMode.SOFT


@pytest.mark.parametrize("value", ["loud", 99, -1, 1.5, ""])
def test_unknown_enum_values_are_refused_with_the_valid_names(value: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="one of msg, error, warn, info, debug"):
        D(pid=1, images_dir="/d", log_level=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["mnt[/a]:a", [""], [1], b"x", 5])
def test_string_lists_take_lists_of_non_empty_strings(value: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="external"):
        D(pid=1, images_dir="/d", external=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [[-1], ["1"], [True], 5])
def test_int_lists_take_non_negative_ints(value: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="unix_sk_inodes"):
        D(pid=1, images_dir="/d", unix_sk_inodes=value)  # type: ignore[arg-type]


def test_misc_field_checks() -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="notify"):
        D(pid=1, images_dir="/d", notify="print")  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="log_file"):
        D(pid=1, images_dir="/d", log_file="../escape.log")
    with pytest.raises(pycriu.InvalidOptionError, match="exclusive"):
        D(pid=1, images_dir="/d", leave_running=True, leave_stopped=True)
    with pytest.raises(pycriu.InvalidOptionError, match="need lazy_pages"):
        D(pid=1, images_dir="/d", lazy_port=27000)
    with pytest.raises(pycriu.InvalidOptionError, match="cannot also send them to a page server"):
        D(pid=1, images_dir="/d", lazy_pages=True, page_server=pycriu.PageServerAddress("h", 1))
    with pytest.raises(pycriu.InvalidOptionError, match="lazy_port"):
        D(pid=1, images_dir="/d", lazy_pages=True, lazy_port=0)  # CRIU refuses --port 0
    with pytest.raises(pycriu.InvalidOptionError, match="page_server"):
        D(pid=1, images_dir="/d", page_server=("127.0.0.1", 27000))  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="ext_mounts"):
        D(pid=1, images_dir="/d", ext_mounts=[("/mnt", "ext")])  # type: ignore[list-item]


def test_restore_specific_checks() -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="inherit_fd.fd"):
        pycriu.InheritFd(-1, "pipe:[1]")
    with pytest.raises(pycriu.InvalidOptionError, match="inherit_fds"):
        R(images_dir="/d", inherit_fds=[(3, "pipe:[1]")])  # type: ignore[list-item]
    with pytest.raises(pycriu.InvalidOptionError, match="exec_cmd"):
        R(images_dir="/d", exec_cmd=[])
    with pytest.raises(pycriu.InvalidOptionError, match="join_ns.ns"):
        pycriu.JoinNamespace("bogus", "/proc/1/ns/net")
    with pytest.raises(pycriu.InvalidOptionError, match="empty_ns"):
        R(images_dir="/d", empty_ns="net")  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="restore_sibling"):
        R(images_dir="/d", restore_sibling=1)  # type: ignore[arg-type]
    assert R(images_dir="/d", empty_ns=Namespace.NET).setter_calls() == [("set_empty_ns", (int(Namespace.NET),))]


def test_pidfd_store_sk_is_sent_on_dump_and_pre_dump_and_refused_on_restore() -> None:
    """CRIU keeps the pidfds of a dump's iterations in the store (criu/pidfd-store.c); a restore
    only checks the socket and never uses it, so RestoreOptions refuses it, naming where it goes."""
    for cls in (D, pycriu.PreDumpOptions):
        opts = cls(pid=1, images_dir="/d", pidfd_store_sk=7)
        assert ("set_pidfd_store_sk", (7,)) in opts.setter_calls()
        assert opts.passed_fds() == (7,)  # checked open before the operation
    assert D(pid=1, images_dir="/d").passed_fds() == ()
    for bad in (-1, True, "7", 7.0):
        with pytest.raises(pycriu.InvalidOptionError, match="pidfd_store_sk"):
            D(pid=1, images_dir="/d", pidfd_store_sk=bad)  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="pidfd_store_sk is an option of DumpOptions and "
                                                          "PreDumpOptions, not of RestoreOptions"):
        R(images_dir="/d", pidfd_store_sk=7)  # type: ignore[arg-type]


def test_unix_sk_inodes_with_ext_unix_sk_false_is_refused_naming_both() -> None:
    """libcriu's criu_local_add_unix_sk turns ext_unix_sk on, and fails when it was set off: the
    combination is refused when the options are built, pointing to external=["unix[INODE]"]."""
    with pytest.raises(pycriu.InvalidOptionError) as info:
        D(pid=1, images_dir="/d", ext_unix_sk=False, unix_sk_inodes=[7])
    assert "unix_sk_inodes and ext_unix_sk=False" in str(info.value) and "external=['unix[INODE]'" in str(info.value)
    with _raw.RawOpts() as raw:  # what libcriu does with the calls this would have made
        raw.apply("set_ext_unix_sk", False)
        with pytest.raises(pycriu.CriuError):
            raw.apply("add_unix_sk", 7)
    for fine in ({"ext_unix_sk": True}, {}):
        assert ("add_unix_sk", (7,)) in D(pid=1, images_dir="/d", unix_sk_inodes=[7], **fine).setter_calls()
    assert D(pid=1, images_dir="/d", ext_unix_sk=False, unix_sk_inodes=[]).setter_calls() == [
        ("set_ext_unix_sk", (False,)), ("set_pid", (1,))]


def test_daemon_options() -> None:
    ps = pycriu.PageServerOptions(images_dir=Path("/d"), log_level="warn")
    assert ps.images_dir == "/d" and ps.port == 0 and ps.log_level is LogLevel.WARN
    assert ps.log_path == Path("/d/page-server.log")
    for bad in ({"port": -1}, {"port": 65536}, {"timeout": 0}, {"address": ""}, {"log_level": "loud"}):
        with pytest.raises(pycriu.InvalidOptionError):
            pycriu.PageServerOptions(images_dir="/d", **bad)  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="page_server"):
        pycriu.LazyPagesOptions(images_dir="/d", page_server="127.0.0.1:27000")  # type: ignore[arg-type]


def test_options_are_frozen() -> None:
    opts = D(pid=1, images_dir="/d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.pid = 2  # type: ignore[misc]


def test_operations_check_the_options_type() -> None:
    criu = pycriu.Criu()
    with pytest.raises(pycriu.InvalidOptionError, match="dump\\(\\) takes DumpOptions"):
        criu.dump(R(images_dir="/d"))  # type: ignore[arg-type]
    with pytest.raises(pycriu.InvalidOptionError, match="dump\\(\\) takes DumpOptions"):
        criu.dump(pycriu.PreDumpOptions(pid=1, images_dir="/d"))
    with pytest.raises(pycriu.InvalidOptionError, match="restore\\(\\) takes RestoreOptions"):
        criu.restore(D(pid=1, images_dir="/d"))  # type: ignore[arg-type]


# --- The config-file channel --------------------------------------------------------------------


def test_options_without_a_libcriu_setter_go_to_the_config_file() -> None:
    assert D(pid=1, images_dir="/d", leave_stopped=True).config_entries() == [("leave-stopped", None)]
    assert R(images_dir="/d", leave_stopped=True).config_entries() == [("leave-stopped", None)]
    assert D(pid=1, images_dir="/d", lazy_pages=True, lazy_port=27000, lazy_address="10.0.0.1").config_entries() == [
        ("lazy-pages", None), ("address", "10.0.0.1"), ("port", "27000")]
    assert R(images_dir="/d", lazy_pages=True).config_entries() == [("lazy-pages", None)]
    assert R(images_dir="/d", display_stats=True).config_entries() == [("display-stats", None)]
    tls = D(pid=1, images_dir="/d", tls=True, tls_cacert="/etc/ca.pem", tls_cert=Path("/etc/c.pem"),
            tls_key="/etc/k.pem", tls_no_cn_verify=True).config_entries()
    assert tls == [("tls", None), ("tls-cacert", "/etc/ca.pem"), ("tls-cert", "/etc/c.pem"),
                   ("tls-key", "/etc/k.pem"), ("tls-no-cn-verify", None)]
    # None of them is ever a libcriu setter call.
    assert D(pid=1, images_dir="/d", leave_stopped=True, tls=True).setter_calls() == [("set_pid", (1,))]


def test_false_uses_criu_no_form_where_criu_has_one_and_is_left_out_otherwise() -> None:
    assert R(images_dir="/d", tls=False, display_stats=False).config_entries() == [
        ("no-display-stats", None), ("no-tls", None)]
    assert R(images_dir="/d", lazy_pages=False, leave_stopped=False).config_entries() == []


def test_criu_options_pass_any_other_long_option() -> None:
    opts = D(pid=1, images_dir="/d", criu_options={"tcp-established": True, "ghost-limit": 1048576,
                                                     "action-script": "/usr/local/bin/hook"})
    assert opts.config_entries() == [("tcp-established", None), ("ghost-limit", "1048576"),
                                     ("action-script", "/usr/local/bin/hook")]


def test_the_config_file_is_private_and_removed() -> None:
    with _config.config_file([("leave-stopped", None), ("port", "27000")]) as path:
        assert path is not None
        assert Path(path).read_text() == "leave-stopped\nport=27000\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)
    with _config.config_file([]) as nothing:
        assert nothing is None


INJECTIONS = ["/etc/ca.pem\nleave-running", "/etc/ca.pem\n", "/etc/ca pem", "/etc/ca.pem#x", '/etc/"ca".pem',
              "/etc/ca\\pem", "/etc/ca\tpem", "/etc/ca\rpem", "/etc/\x1bca"]


@pytest.mark.parametrize("value", INJECTIONS)
def test_config_bound_paths_that_could_inject_are_refused(value: str) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="cannot be passed safely"):
        D(pid=1, images_dir="/d", tls_cacert=value)


@pytest.mark.parametrize("value", ["10.0.0.1\nleave-running", "10.0.0.1 x", "host#1", '"h"'])
def test_lazy_address_that_could_inject_is_refused(value: str) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="cannot be passed safely"):
        D(pid=1, images_dir="/d", lazy_pages=True, lazy_address=value)


@pytest.mark.parametrize("value", INJECTIONS + [""])
def test_criu_options_values_that_could_inject_are_refused(value: str) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="cannot be passed safely"):
        D(pid=1, images_dir="/d", criu_options={"action-script": value})


@pytest.mark.parametrize("value", [False, 1.5, None, b"x", ["a"]])
def test_criu_options_values_are_true_strings_or_ints(value: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="criu_options"):
        D(pid=1, images_dir="/d", criu_options={"ghost-limit": value})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["--tcp-established", "TCP", "tcp established", "tcp\nleave-running", "tcp-close\n",
                                 "", "1abc", "a#b", 5])
def test_criu_options_keys_must_be_plain_long_option_names(key: object) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="option name"):
        D(pid=1, images_dir="/d", criu_options={key: True})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", sorted(_config._FORBIDDEN))
def test_criu_options_cannot_override_what_pycriu_owns(key: str) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="set by pycriu itself"):
        D(pid=1, images_dir="/d", criu_options={key: "x"})


def test_criu_options_must_be_a_mapping() -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="mapping"):
        D(pid=1, images_dir="/d", criu_options=[("tcp-established", True)])  # type: ignore[arg-type]


# --- Properties ---------------------------------------------------------------------------------

SAFE_TOKEN = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
                           exclude_characters='#"\\\x85\xa0'),
    min_size=1, max_size=40,
).filter(lambda s: not any(c.isspace() for c in s))
VALUE_OPTION = st.sampled_from(sorted(k for k, kind in _config.CRIU_OPTIONS.items()
                                     if kind != "no" and k not in _config._FORBIDDEN))
FLAG_OPTION = st.sampled_from(sorted(k for k, kind in _config.CRIU_OPTIONS.items()
                                    if kind != "required" and k not in _config._FORBIDDEN))


@given(before=st.text(max_size=20), after=st.text(max_size=20), newline=st.sampled_from(["\n", "\r", "\x0b", "\x0c"]))
@example(before="/etc/ca.pem", after="leave-running", newline="\n")
def test_any_value_with_a_line_break_is_refused_everywhere(before: str, after: str, newline: str) -> None:
    value = before + newline + after
    with pytest.raises(pycriu.InvalidOptionError):
        D(pid=1, images_dir="/d", criu_options={"action-script": value})
    with pytest.raises(pycriu.InvalidOptionError):
        R(images_dir="/d", tls_key=value)
    with pytest.raises(pycriu.InvalidOptionError):
        _config.render([("action-script", value)])


@given(key=VALUE_OPTION, token=SAFE_TOKEN)
def test_any_safe_token_round_trips_through_the_config_file(key: str, token: str) -> None:
    text = _config.render([(key, token)])
    # One line with no blank: CRIU's parser hands it to getopt as the single word --key=token, so
    # getopt binds the token to its option and it can never stand as an option of its own.
    assert text.count("\n") == 1 and text.endswith("\n")
    assert not any(c.isspace() for c in text[:-1])
    assert text[:-1].split("=", 1) == [key, token]
    opts = D(pid=1, images_dir="/d", criu_options={key: token})
    assert opts.config_entries() == [(key, token)]


@given(key=FLAG_OPTION)
def test_flags_render_as_a_bare_option_name(key: str) -> None:
    assert _config.render([(key, None)]) == key + "\n"


@pytest.mark.parametrize("abbreviation", ["image", "work", "conf", "tre", "pidf", "status", "log-f", "no-default"])
def test_prefixes_getopt_would_expand_are_refused(abbreviation: str) -> None:
    """getopt_long accepts a unique prefix of an option name; only exact names are accepted, so a
    prefix cannot reach an option pycriu owns (images-dir, work-dir, config, tree, ...)."""
    with pytest.raises(pycriu.InvalidOptionError, match="not one of CRIU 4.2's long options"):
        D(pid=1, images_dir="/d", criu_options={abbreviation: "/elsewhere"})


@pytest.mark.parametrize("flag", ["shell-job", "leave-running", "tcp-established", "no-tcp-close"])
def test_a_value_given_to_a_flag_is_refused(flag: str) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="takes no value"):
        D(pid=1, images_dir="/d", criu_options={flag: "--leave-running"})


def test_an_option_that_needs_a_value_is_refused_without_one() -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="needs a value"):
        D(pid=1, images_dir="/d", criu_options={"freeze-cgroup": True})


def test_values_are_written_as_one_word() -> None:
    opts = D(pid=1, images_dir="/d", criu_options={"cpu-cap": "--leave-running", "ghost-limit": 5})
    assert _config.render(opts.config_entries()) == "cpu-cap=--leave-running\nghost-limit=5\n"


@pytest.mark.parametrize("kwargs", [
    {"lazy_pages": 1}, {"tls": "yes"}, {"timeout": True}, {"timeout": 0}, {"log_file": "../../etc/x"},
    {"port": -1}, {"port": 65536}, {"address": ""}, {"tls_no_cn_verify": "no"},
])
def test_page_server_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(pycriu.InvalidOptionError):
        pycriu.PageServerOptions(images_dir="/d", **kwargs)  # type: ignore[arg-type]


def test_lazy_pages_options_take_tls_like_criu() -> None:
    opts = pycriu.LazyPagesOptions(images_dir=Path("/d"), tls=True, tls_cacert=Path("/ca.pem"),
                                   tls_cacrl="/crl.pem", tls_no_cn_verify=True)
    assert opts.tls_cacert == "/ca.pem" and opts.tls_cacrl == "/crl.pem"
    with pytest.raises(pycriu.InvalidOptionError):
        pycriu.LazyPagesOptions(images_dir="/d", page_server=("127.0.0.1", 1))  # type: ignore[arg-type]
