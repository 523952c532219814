"""Reading CRIU's images for what the migration needs from them: which tasks the dump found
stopped (and by which signal). Real images come from zdtm's ``stopped*`` tests in
tests/test_conformance.py; here, hostile ones, which must give a clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pycriu.migration.images import stopped_tasks

COMMON, PSTREE, CORE = 0x54564319, 0x50273030, 0x55053847


def _image(path: Path, magic: int, *messages: bytes) -> None:
    path.write_bytes(struct.pack("<II", COMMON, magic)
                     + b"".join(struct.pack("<I", len(m)) + m for m in messages))


def _varint(value: int) -> bytes:
    out = b""
    while True:
        b, value = value & 0x7F, value >> 7
        out += bytes([b | (0x80 if value else 0)])
        if not value:
            return out


def _varint_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _core(state: int, signo: int | None) -> bytes:
    tc = _varint_field(1, state) + (_varint_field(21, signo) if signo is not None else b"")
    return _varint_field(1, 1) + bytes([3 << 3 | 2, len(tc)]) + tc


def test_stopped_tasks_are_read_with_their_signal(tmp_path: Path) -> None:
    _image(tmp_path / "pstree.img", PSTREE, _varint_field(1, 1), _varint_field(1, 7), _varint_field(1, 9))
    _image(tmp_path / "core-1.img", CORE, _core(1, None))  # alive
    _image(tmp_path / "core-7.img", CORE, _core(3, 20))  # stopped by SIGTSTP
    _image(tmp_path / "core-9.img", CORE, _core(3, None))  # stopped, no signal recorded
    assert stopped_tasks(tmp_path) == {7: 20, 9: 0}


@pytest.mark.parametrize("damage", ["magic", "truncated", "length", "missing core"])
def test_a_damaged_image_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    _image(tmp_path / "pstree.img", PSTREE, _varint_field(1, 5))
    _image(tmp_path / "core-5.img", CORE, _core(3, 19))
    pstree = tmp_path / "pstree.img"
    if damage == "magic":
        _image(pstree, CORE, _varint_field(1, 5))
    elif damage == "truncated":
        pstree.write_bytes(pstree.read_bytes()[:10])
    elif damage == "length":
        pstree.write_bytes(struct.pack("<III", COMMON, PSTREE, 1 << 30) + b"\x08\x05")
    else:
        (tmp_path / "core-5.img").unlink()
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        stopped_tasks(tmp_path)
    assert "pstree" in str(e.value) or "core-5.img" in str(e.value)


def test_the_page_images_a_page_server_writes_include_the_shared_memory_pagemap() -> None:
    """A page server writes pagemap-N, pagemap-shmem-N and pages-N; a rollback on one host takes
    all of them back (without pagemap-shmem, CRIU 'Can't restore shmem content': zdtm maps06)."""
    from pycriu.migration.messages import PAGE_IMAGE

    for name in ("pagemap-12.img", "pagemap-shmem-0.img", "pages-3.img"):
        assert PAGE_IMAGE.fullmatch(name), name
    for name in ("core-12.img", "pagemap-shmem-x.img", "../pages-1.img", "pstree.img"):
        assert not PAGE_IMAGE.fullmatch(name), name
