"""Reading CRIU's images for what the migration needs from them: which tasks the dump found
stopped (and by which signal), and the pagemaps. Real images come from zdtm's ``stopped*`` tests in
tests/test_conformance.py; here, hostile ones, which must give a clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pycriu.images import magic
from pycriu.images.schema import message_class
from pycriu.migration.images import read_pagemap, stopped_tasks

COMMON, PSTREE, CORE = magic.IMG_COMMON, magic.by_name["PSTREE"], magic.by_name["CORE"]


def _image(path: Path, type_magic: int, *messages: bytes) -> None:
    path.write_bytes(struct.pack("<II", COMMON, type_magic)
                     + b"".join(struct.pack("<I", len(m)) + m for m in messages))


def _pstree(pid: int) -> bytes:
    return message_class("pstree_entry")(pid=pid, ppid=0, pgid=pid, sid=pid).SerializeToString()


def _core(state: int, signo: int | None) -> bytes:
    """A core image's entry with CRIU's own schema (proto2: the required fields are set)."""
    tc = message_class("task_core_entry")(task_state=state, exit_code=0, personality=0, flags=0, blk_sigset=0,
                                          comm="t")
    if signo is not None:
        tc.stop_signo = signo
    return message_class("core_entry")(mtype=1, tc=tc).SerializeToString()


def test_stopped_tasks_are_read_with_their_signal(tmp_path: Path) -> None:
    _image(tmp_path / "pstree.img", PSTREE, _pstree(1), _pstree(7), _pstree(9))
    _image(tmp_path / "core-1.img", CORE, _core(1, None))  # alive
    _image(tmp_path / "core-7.img", CORE, _core(3, 20))  # stopped by SIGTSTP
    _image(tmp_path / "core-9.img", CORE, _core(3, None))  # stopped, no signal recorded
    assert stopped_tasks(tmp_path) == {7: 20, 9: 0}


@pytest.mark.parametrize("damage", ["magic", "truncated", "length", "garbage", "truncated core", "missing core"])
def test_a_damaged_image_is_a_clear_error_that_names_the_file(tmp_path: Path, damage: str) -> None:
    _image(tmp_path / "pstree.img", PSTREE, _pstree(5))
    _image(tmp_path / "core-5.img", CORE, _core(3, 19))
    pstree, core = tmp_path / "pstree.img", tmp_path / "core-5.img"
    if damage == "magic":
        _image(pstree, CORE, _pstree(5))
    elif damage == "truncated":
        pstree.write_bytes(pstree.read_bytes()[:10])
    elif damage == "length":
        pstree.write_bytes(struct.pack("<III", COMMON, PSTREE, 1 << 30) + b"\x08\x05")
    elif damage == "garbage":
        _image(pstree, PSTREE, b"\xff" * 6)
    elif damage == "truncated core":
        core.write_bytes(core.read_bytes()[:-3])
    else:
        core.unlink()
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        stopped_tasks(tmp_path)
    assert str(core if "core" in damage else pstree) in str(e.value)


def test_the_page_images_a_page_server_writes_include_the_shared_memory_pagemap() -> None:
    """A page server writes pagemap-N, pagemap-shmem-N and pages-N; a rollback on one host takes
    all of them back (without pagemap-shmem, CRIU 'Can't restore shmem content': zdtm maps06)."""
    from pycriu.migration.messages import PAGE_IMAGE

    for name in ("pagemap-12.img", "pagemap-shmem-0.img", "pages-3.img"):
        assert PAGE_IMAGE.fullmatch(name), name
    for name in ("core-12.img", "pagemap-shmem-x.img", "../pages-1.img", "pstree.img"):
        assert not PAGE_IMAGE.fullmatch(name), name


def test_a_pagemap_is_read_with_its_head_and_each_entry_s_flags(tmp_path: Path) -> None:
    m = message_class
    entries = [m("pagemap_entry")(vaddr=0x1000, compat_nr_pages=0, nr_pages=3, flags=4),   # present
               m("pagemap_entry")(vaddr=0x8000, compat_nr_pages=2, in_parent=True),         # an old image
               m("pagemap_entry")(vaddr=0xa000, compat_nr_pages=0, nr_pages=1, flags=2 | 4)]  # lazy, present
    _image(tmp_path / "pagemap-3.img", magic.by_name["PAGEMAP"], m("pagemap_head")(pages_id=9).SerializeToString(),
           *(e.SerializeToString() for e in entries))
    pm = read_pagemap(tmp_path / "pagemap-3.img")
    assert pm.pages_name == "pages-9.img"
    assert [(e.vaddr, e.nr_pages, e.present, e.in_parent, e.lazy) for e in pm.entries] == [
        (0x1000, 3, True, False, False), (0x8000, 2, False, True, False), (0xA000, 1, True, False, True)]
    assert pm.count(lazy=False, present=True) == 3
    with pytest.raises(ValueError, match="PSTREE image, expected PAGEMAP"):
        _image(tmp_path / "pagemap-4.img", PSTREE, _pstree(1))
        read_pagemap(tmp_path / "pagemap-4.img")
    truncated = tmp_path / "pagemap-5.img"
    truncated.write_bytes((tmp_path / "pagemap-3.img").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"pagemap-5\.img: .*truncated"):
        read_pagemap(truncated)
    (tmp_path / "pagemap-6.img").write_bytes(struct.pack("<II", COMMON, magic.by_name["PAGEMAP"]))
    with pytest.raises(ValueError, match="no pagemap head"):
        read_pagemap(tmp_path / "pagemap-6.img")
