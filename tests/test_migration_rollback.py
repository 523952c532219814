"""On one host, what a failure after the freeze brings the source back from
(:mod:`pycriu.migration.rollback`): the rules, without root. The migrations themselves, and
their failures, are in test_migration_same_host.py."""

from __future__ import annotations

import pytest

from pycriu import InvalidOptionError, Migration
from pycriu.migration.errors import PreflightError
from pycriu.migration.rollback import IMAGES, STOPPED_SOURCE, choose

PORT = ["listening TCP port 8080 (pid 7)"]
ENDING = ("classic", "page-server", "page-server-on-source")
SERVING = ("lazy", "pre-copy", "hybrid")


def test_auto_ends_the_source_where_the_flow_can() -> None:
    """classic, page-server and page-server-on-source end the source at the dump, as criu dump
    does: the restore reuses its memory; the note says how to keep it stopped instead."""
    for mode in ENDING:
        choice = choose("auto", mode, mode, "asked", [])
        assert (choice.mode, choice.mode_reason, choice.plan) == (mode, "asked", IMAGES)
        assert "same_host_rollback='stopped-source'" in choice.note


def test_auto_keeps_the_stopped_source_of_flows_that_serve_pages_from_it() -> None:
    for mode in SERVING:
        choice = choose("auto", mode, mode, "asked", [])
        assert (choice.mode, choice.plan, choice.note) == (mode, STOPPED_SOURCE, "")


def test_the_stopped_source_can_be_kept_in_every_flow() -> None:
    for mode in ENDING + SERVING:
        assert choose("stopped-source", mode, mode, "", []).plan == STOPPED_SOURCE


def test_the_images_can_be_asked_for_where_the_flow_can_end_the_source() -> None:
    assert choose("images", "page-server", "page-server", "", []).plan == IMAGES
    lazy = choose("images", "lazy", "lazy", "", [])
    assert (lazy.mode, lazy.plan) == ("page-server-on-source", IMAGES)
    assert "same_host_rollback='images'" in lazy.mode_reason
    for mode in ("pre-copy", "hybrid"):
        with pytest.raises(PreflightError, match=f"the {mode} flow cannot end the source") as info:
            choose("images", mode, mode, "", [])
        assert "mode='classic'" in (info.value.hint or "")


def test_host_wide_names_need_the_images() -> None:
    choice = choose("auto", "auto", "lazy", "both hosts have lazy pages", PORT)
    assert (choice.mode, choice.plan) == ("page-server-on-source", IMAGES)
    assert "8080" in choice.note and "8080" in choice.mode_reason
    with pytest.raises(PreflightError, match="pre-copy flow cannot end the source") as info:
        choose("auto", "pre-copy", "pre-copy", "", PORT)
    assert info.value.resources == tuple(PORT)
    # auto chose pre-copy (lazy pages missing on a side): it moves to page-server, not refused
    choice = choose("auto", "auto", "pre-copy", "no lazy pages", PORT)
    assert (choice.mode, choice.plan) == ("page-server", IMAGES) and "8080" in choice.mode_reason


def test_a_kept_source_cannot_hold_names_the_destination_restores() -> None:
    with pytest.raises(PreflightError, match="'stopped-source' keeps the source holding listening") as info:
        choose("stopped-source", "classic", "classic", "", PORT)
    assert "same_host_rollback='auto' or 'images'" in (info.value.hint or "")


def test_the_option_is_checked_when_the_migration_is_made() -> None:
    with pytest.raises(InvalidOptionError, match="same_host_rollback='never' is invalid"):
        Migration(1, same_host_rollback="never")
    with pytest.raises(InvalidOptionError, match="applies only to a migration on this host") as info:
        Migration(1, to="ssh://host", same_host_rollback="images")
    assert "always the stopped source" in (info.value.hint or "")
    assert Migration(1, to="ssh://host").same_host_rollback == "auto"


def test_a_container_keeps_its_stopped_source() -> None:
    """Its runtime restores its images (root, mounts): a rollback from them would fail."""
    for mode in ENDING:
        assert choose("auto", mode, mode, "", [], container=True).plan == STOPPED_SOURCE
    with pytest.raises(PreflightError, match="cannot be the rollback of a container") as info:
        choose("images", "classic", "classic", "", [], container=True)
    assert "'stopped-source'" in (info.value.hint or "")


def test_page_server_keeps_the_stopped_source_when_its_pages_could_not_come_back_by_link() -> None:
    """An agent whose images are on another filesystem: ending the source would copy every page
    back inside the freeze; classic is not concerned (its images stay the source's)."""
    choice = choose("auto", "page-server", "page-server", "", [], links=False)
    assert choice.plan == STOPPED_SOURCE and "another filesystem" in choice.note
    assert choose("auto", "classic", "classic", "", [], links=False).plan == IMAGES
    assert choose("images", "page-server", "page-server", "", [], links=False).plan == IMAGES


def test_link_remap_keeps_the_stopped_source_unless_asked_otherwise() -> None:
    """With link_remap the dump may keep deleted open files as links that a restore that worked
    removes: after a destination that restored and then failed, the images could not bring the
    files back, the stopped source still holds them. Names or an explicit 'images' still win."""
    for mode in ENDING:
        choice = choose("auto", mode, mode, "", [], remaps=True)
        assert choice.plan == STOPPED_SOURCE and "link_remap" in choice.note
        assert choose("images", mode, mode, "", [], remaps=True).plan == IMAGES
        assert choose("auto", mode, mode, "", PORT, remaps=True).plan == IMAGES
