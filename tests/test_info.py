"""Asking CRIU about itself: its version, whether checkpoint/restore works here, and which optional
features this kernel offers. Each answer comes from the real ``criu`` binary through libcriu."""

from __future__ import annotations

import pytest
from conftest import needs_root

import pycriu


@needs_root
def test_version_is_at_least_what_pycriu_needs(criu: pycriu.Criu) -> None:
    version = criu.version()
    assert isinstance(version, pycriu.CriuVersion)
    assert version >= pycriu.required_version() >= pycriu.MIN_CRIU_VERSION == (3, 17)
    # The string form is what `criu --version` prints.
    assert str(version) == f"{version.major}.{version.minor}.{version.sublevel}"


@needs_root
def test_require_version_passes_for_the_installed_criu_and_refuses_a_future_one(criu: pycriu.Criu) -> None:
    assert criu.require_version() == criu.version()
    with pytest.raises(pycriu.CriuVersionError, match="older than 99.0"):
        criu.require_version((99, 0))


@needs_root
def test_check_says_checkpoint_restore_works_here(criu: pycriu.Criu) -> None:
    assert criu.check() is True


@needs_root
def test_before_criu_4_2_check_runs_the_criu_check_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # CRIU 3.17's worker crashed on libcriu's check request (found with Debian 12's criu in the
    # test VM): there Criu.check runs `criu check`. Here the command runs as if CRIU were older.
    import pycriu.criu

    monkeypatch.setattr(pycriu.criu, "_RPC_CHECK_WORKS", (99, 0))
    ran: list[list[str]] = []
    real_run = pycriu.criu.subprocess.run

    def run(argv: list[str], **kw: object) -> object:
        ran.append(argv)
        return real_run(argv, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(pycriu.criu.subprocess, "run", run)
    criu = pycriu.Criu()
    assert criu.check() is True
    assert ran and ran[0][:2] == [criu.binary, "check"]
    # and when the command fails, the error carries what CRIU said (here: before its log opened)
    with pytest.raises(pycriu.CheckError, match="check exited with status") as failed:
        criu._check_command("/proc/self", "/proc/self/check.log")  # noqa: SLF001 - no log can go there
    assert failed.value.criu_message is not None and "log" in failed.value.criu_message


@needs_root
def test_features_are_booleans_and_lazy_pages_work_here(criu: pycriu.Criu) -> None:
    features = criu.features()
    assert isinstance(features, pycriu.Features)
    for name in ("mem_track", "lazy_pages", "pidfd_store"):
        assert isinstance(getattr(features, name), bool), name
    # userfaultfd is available on this platform; soft-dirty tracking may or may not be.
    assert features.lazy_pages is True


@needs_root
def test_features_are_cached_until_refreshed(criu: pycriu.Criu) -> None:
    first = criu.features()
    assert criu.features() is first
    fresh = criu.features(refresh=True)
    assert fresh == first


@pytest.mark.parametrize(
    ("code", "expected"),
    [(40201, (4, 2, 1)), (40200, (4, 2, 0)), (31701, (3, 17, 1)), (100000, (10, 0, 0)), (41299, (4, 12, 99))],
)
def test_version_code_decodes_major_minor_sublevel(code: int, expected: tuple[int, int, int]) -> None:
    version = pycriu.CriuVersion.from_code(code)
    assert version == expected
    assert (version.major, version.minor, version.sublevel) == expected


def test_versions_compare_as_tuples() -> None:
    assert pycriu.CriuVersion(4, 2, 1) >= (4, 2)
    assert pycriu.CriuVersion(4, 1, 99) < (4, 2)
    assert pycriu.CriuVersion(4, 10) > pycriu.CriuVersion(4, 9, 5)
