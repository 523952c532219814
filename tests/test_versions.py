"""CRIU versions as the hosts of a migration exchange them: parsed one way, compared one way
(a destination's CRIU must not be older than the source's). Pure logic: no root needed."""

from __future__ import annotations

import pytest

from pycriu import CriuVersion
from pycriu._raw import RawOpts
from pycriu.migration.checks import older_destination


@pytest.mark.parametrize(("text", "version"), [("4.2.1", (4, 2, 1)), ("4.2", (4, 2, 0)), ("3.17.1", (3, 17, 1))])
def test_a_version_parses_back_from_its_text(text: str, version: tuple[int, int, int]) -> None:
    parsed = CriuVersion.parse(text)
    assert parsed == version
    assert CriuVersion.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["", "4", "4.2.1.0", "4.x", "v4.2", "4.2.1-dirty", " 4.2"])
def test_anything_else_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="is not a CRIU version"):
        CriuVersion.parse(text)


def test_versions_compare_as_numbers_not_text() -> None:
    assert CriuVersion.parse("4.10.0") > CriuVersion.parse("4.9.9")
    assert older_destination("4.10.0", "4.9.0") == "destination CRIU 4.9.0 is older than the source's 4.10.0"
    assert older_destination("4.2.1", "4.2.1") is None
    assert older_destination("4.1", "4.2.0") is None


def test_an_unreadable_version_is_a_reason_not_a_silent_zero() -> None:
    reason = older_destination("4.2.1", "garbage")
    assert reason is not None and "'garbage' is not a CRIU version" in reason


def test_options_whose_creation_failed_close_quietly() -> None:
    """``__del__`` of a RawOpts whose ``__init__`` raised before the options existed (an
    AttributeError printed as "Exception ignored in ..." before)."""
    opts = RawOpts.__new__(RawOpts)
    opts.close()
    opts.__del__()
