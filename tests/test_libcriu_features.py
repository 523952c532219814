"""What the libcriu pycriu was built against has: everything with CRIU 4.2; with Debian 12's
3.17 (the test VM builds against it, docs/testvm.rst) the options it lacks are refused by name,
with the version that has them, before CRIU runs. The configuration file works with both: 3.17's
CRIU reads the request's field, which the extension sets itself there."""

from __future__ import annotations

import pytest

import pycriu
from pycriu import _raw
from pycriu.enums import Namespace, NetworkLockMethod

#: setter -> arguments of one real call
CALLS = {"set_empty_ns": (int(Namespace.NET),), "set_skip_file_rwx_check": (True,)}

old_libcriu = pytest.mark.skipif(not _raw.MISSING_SETTERS, reason=(
    "this pycriu is built against libcriu %d.%d, which has every setter (build against Debian 12's criu 3.17, "
    "as the test VM's 3.17 run does, to see the refusals)" % _raw.COMPILED_VERSION))
full_libcriu = pytest.mark.skipif(bool(_raw.MISSING_SETTERS), reason=(
    "this pycriu is built against libcriu %d.%d, which lacks %s" % (*_raw.COMPILED_VERSION,
                                                                   ", ".join(_raw.MISSING_SETTERS))))


def test_the_floor_is_debian_12s_criu_and_a_binary_never_older_than_its_libcriu() -> None:
    assert pycriu.MIN_CRIU_VERSION == (3, 17)
    assert pycriu.required_version() == max((3, 17), _raw.COMPILED_VERSION)


@full_libcriu
@pytest.mark.parametrize("setter", sorted(CALLS))
def test_libcriu_42_has_every_setter(setter: str) -> None:
    with _raw.RawOpts() as raw:
        raw.apply(setter, *CALLS[setter])
        raw.apply("set_network_lock", int(NetworkLockMethod.SKIP))


@old_libcriu
@pytest.mark.parametrize("setter", sorted(_raw.MISSING_SETTERS))
def test_an_older_libcriu_refuses_what_it_lacks_by_name(setter: str) -> None:
    with _raw.RawOpts() as raw, pytest.raises(pycriu.CriuVersionError,
                                              match=rf"criu_local_{setter} needs libcriu >= 4\.2"):
        raw.apply(setter, *CALLS[setter])


@pytest.mark.skipif(_raw.HAS_NETWORK_LOCK_SKIP, reason="this libcriu has CRIU_NETWORK_LOCK_SKIP (4.2)")
def test_an_older_libcriu_refuses_network_lock_skip() -> None:
    with _raw.RawOpts() as raw, pytest.raises(pycriu.CriuVersionError,
                                              match="NetworkLockMethod.SKIP needs libcriu >= 4.2"):
        raw.apply("set_network_lock", int(NetworkLockMethod.SKIP))
    with _raw.RawOpts() as raw:
        raw.apply("set_network_lock", int(NetworkLockMethod.IPTABLES))  # what 3.17 has still works


def test_every_build_can_pass_criu_a_configuration_file() -> None:
    """The options with no libcriu setter go to CRIU in a configuration file, on 3.17 too."""
    assert "set_config_file" not in _raw.MISSING_SETTERS
    with _raw.RawOpts() as raw:
        raw.apply("set_config_file", "/nonexistent.conf")  # CRIU reads it; the option only names it
        raw.apply("set_config_file", "/replaced.conf")  # the first copy is freed, the second at close
