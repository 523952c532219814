"""A process's memory read and searched straight from its checkpoint's page images.

Real dumps of a tree whose memory is known (tests/memory_support.py) check reads and searches at
known addresses; small hand-made checkpoints (no root needed) check what real dumps on this
machine cannot show: pages in a parent checkpoint, lazy pages, a needle across two page files,
and broken images.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_mem_track, needs_root
from memory_support import PAGES, REWRITE, TAG_BYTES, KnownTree, known_tree, word

import pycriu
from pycriu.images import ImageError, magic
from pycriu.images.checkpoint import Checkpoint
from pycriu.images.memory import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, Memory, MemoryNotInImages
from pycriu.images.schema import message_class

# -- real dumps ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KnownTree, Path]]:
    if os.geteuid() != 0:
        pytest.skip("not root: checkpoint/restore needs CAP_SYS_ADMIN")
    work = tmp_path_factory.mktemp("memory")
    with known_tree(work) as kt:
        yield kt, kt.dump(work / "images")


@needs_root
@pytest.mark.criu
def test_a_read_at_an_address_gives_what_the_process_wrote_there(dumped: tuple[KnownTree, Path]) -> None:
    kt, d = dumped
    with Memory(d) as mem:
        space = mem.space(1)
        for i in (0, 1, 255, PAGES - 1):
            assert space.read(kt.base + i * PAGE_SIZE, 16) == word(i) + TAG_BYTES
        # one read across many pages, from several pagemap entries' worth of bytes
        whole = space.read(kt.base, PAGES * PAGE_SIZE)
        assert [whole[i * PAGE_SIZE:i * PAGE_SIZE + 8] for i in range(PAGES)] == [word(i) for i in range(PAGES)]
        # the forked child shares nothing but has the same bytes (copied on write)
        assert mem.space(3).read(kt.base + 7 * PAGE_SIZE, 8) == word(7)


@needs_root
@pytest.mark.criu
def test_memory_never_written_reads_as_zeros_and_unmapped_memory_is_an_error(dumped: tuple[KnownTree, Path]) -> None:
    kt, d = dumped
    with Memory(d) as mem:
        space = mem.space(1)
        assert space.read(kt.untouched, 16 * PAGE_SIZE) == bytes(16 * PAGE_SIZE)
        # not one of those pages is in the images (the kernel may have merged the mapping with a
        # neighbour, so its page count says nothing of them alone)
        assert {how for _, (_s, _n, how, *_) in space.pieces(kt.untouched, 16 * PAGE_SIZE)} == {"absent"}
        with pytest.raises(MemoryNotInImages, match="0x1000: not mapped") as e:
            space.read(0x1000, 8)
        assert e.value.address == 0x1000
        with pytest.raises(ImageError, match="no process 99"):
            mem.space(99)


@needs_root
@pytest.mark.criu
def test_a_search_finds_each_word_where_it_was_written(dumped: tuple[KnownTree, Path]) -> None:
    kt, d = dumped
    region = range(kt.base, kt.base + PAGES * PAGE_SIZE)
    with Memory(d) as mem:
        space = mem.space(1)
        count, hits = space.find(TAG_BYTES, limit=10_000)
        inside = sorted(h.address for h in hits if h.address in region)
        assert inside == [kt.base + i * PAGE_SIZE + 8 for i in range(PAGES)]
        assert count == len(hits)  # the limit was not reached: every hit is listed
        assert all(h.mapping.contains(h.address) for h in hits)
        count, hits = space.find(word(123))
        assert [h.address for h in hits if h.address in region] == [kt.base + 123 * PAGE_SIZE]
        assert hits[0].mapping.kind == "anon"
        # a limit caps the list, not the count
        count, hits = space.find(TAG_BYTES, limit=5)
        assert len(hits) == 5 and count >= PAGES
        # a regular expression finds the same words
        rcount, rhits = space.find_regex(re.compile(re.escape(TAG_BYTES)), limit=10_000)
        assert rcount == count and sorted(h.address for h in rhits) == sorted(
            h.address for h in space.find(TAG_BYTES, limit=10_000)[1])


@needs_root
@pytest.mark.criu
def test_the_command_searches_and_dumps_memory(dumped: tuple[KnownTree, Path]) -> None:
    kt, d = dumped

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pycriu", "inspect", str(d), *args], capture_output=True,
                              text=True, timeout=60)

    out = run("--search-hex", word(42).hex(), "--pid", "1", "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert kt.base + 42 * PAGE_SIZE in [h["address"] for h in found["hits"]]
    assert run("--search", "no such text anywhere: 7e1b9c").returncode == 1
    dump = run("--read", f"1:{kt.base + PAGE_SIZE:x}:16")
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.split()[1:9] == [f"{b:02x}" for b in word(1)]
    bad = run("--read", "1:zz:16")
    assert bad.returncode == 2 and "PID:ADDRESS:SIZE" in bad.stderr


# -- hand-made checkpoints -----------------------------------------------------------------------

BASE = 0x7F0000000000


def _image(name: str, *entries: object) -> bytes:
    out = io.BytesIO()
    if name != "INVENTORY":
        out.write(struct.pack("<I", magic.IMG_SERVICE if name == "STATS" else magic.IMG_COMMON))
    out.write(struct.pack("<I", magic.by_name[name]))
    for e in entries:
        data = e.SerializeToString()  # type: ignore[attr-defined]
        out.write(struct.pack("<I", len(data)) + data)
    return out.getvalue()


def _checkpoint(d: Path, pagemap: list[tuple[int, int, int]], pages: bytes, vmas: int = 8) -> Path:
    """A one-process checkpoint: an anonymous mapping of ``vmas`` pages at BASE, the pagemap
    entries ``(page index, pages, flags)`` and the page file's bytes."""
    d.mkdir()
    m = message_class
    (d / "inventory.img").write_bytes(_image("INVENTORY", m("inventory_entry")(img_version=2)))
    (d / "pstree.img").write_bytes(_image("PSTREE", m("pstree_entry")(pid=1, ppid=0, pgid=1, sid=1, threads=[1])))
    vma = m("vma_entry")(start=BASE, end=BASE + vmas * PAGE_SIZE, pgoff=0, shmid=0, prot=3, flags=0x22,
                         status=(1 << 0) | (1 << 9), fd=-1)
    (d / "mm-1.img").write_bytes(_image("MM", m("mm_entry")(
        mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0, mm_start_stack=0, mm_start_brk=0,
        mm_brk=0, mm_arg_start=0, mm_arg_end=0, mm_env_start=0, mm_env_end=0, exe_file_id=0, vmas=[vma])))
    entries = [m("pagemap_entry")(vaddr=BASE + i * PAGE_SIZE, compat_nr_pages=0, nr_pages=n, flags=f)
               for i, n, f in pagemap]
    (d / "pagemap-1.img").write_bytes(_image("PAGEMAP", m("pagemap_head")(pages_id=1), *entries))
    (d / "pages-1.img").write_bytes(pages)
    return d


def _page(text: bytes) -> bytes:
    return text.ljust(PAGE_SIZE, b".")


def test_pages_in_the_parent_checkpoint_are_read_there(tmp_path: Path) -> None:
    parent = _checkpoint(tmp_path / "1", [(0, 4, PE_PRESENT)], b"".join(_page(b"old %d" % i) for i in range(4)))
    child = _checkpoint(tmp_path / "2", [(0, 1, PE_PARENT), (1, 1, PE_PRESENT), (2, 2, PE_PARENT)],
                        _page(b"new 1"))
    (child / "parent").symlink_to("../1")
    with Memory(child) as mem:
        space = mem.space(1)
        got = space.read(BASE, 4 * PAGE_SIZE)
        assert [got[i * PAGE_SIZE:i * PAGE_SIZE + 5] for i in range(4)] == [b"old 0", b"new 1", b"old 2", b"old 3"]
        [mapping] = space.mappings
        assert (mapping.pages_images, mapping.pages_parent, mapping.pages_lazy) == (1, 3, 0)
        # a needle across the seam between the child's page file and the parent's is found once
        seam = BASE + 2 * PAGE_SIZE - 3
        count, hits = space.find(b"...old 2")
        assert count == 1 and [h.address for h in hits] == [seam]
        count, hits = space.find_regex(re.compile(rb"\.\.\.old [0-9]"))
        assert sorted(h.address for h in hits) == [BASE + i * PAGE_SIZE - 3 for i in (2, 3)]
        assert [h.address for h in space.find(b"...new 1")[1]] == [BASE + PAGE_SIZE - 3]
    del parent


def test_a_missing_parent_and_lazy_pages_are_said_so(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "c", [(0, 1, PE_PARENT), (1, 2, PE_LAZY), (3, 1, PE_LAZY | PE_PRESENT)],
                    _page(b"present and lazy"))
    with Memory(d) as mem:
        space = mem.space(1)
        with pytest.raises(MemoryNotInImages, match="in the parent checkpoint, but this one has no parent"):
            space.read(BASE, 8)
        with pytest.raises(MemoryNotInImages, match="left for a lazy restore") as e:
            space.read(BASE + PAGE_SIZE + 100, 8)
        assert e.value.address == BASE + PAGE_SIZE + 100
        assert space.read(BASE + 3 * PAGE_SIZE, 16) == b"present and lazy"
        [mapping] = space.mappings
        assert (mapping.pages_images, mapping.pages_parent, mapping.pages_lazy) == (1, 0, 2)
        # memory beyond the dumped pages was never written
        assert space.read(BASE + 4 * PAGE_SIZE, 8) == bytes(8)


def test_a_truncated_page_file_and_a_disordered_pagemap_are_refused(tmp_path: Path) -> None:
    short = _checkpoint(tmp_path / "short", [(0, 2, PE_PRESENT)], _page(b"only one"))
    with Memory(short) as mem, pytest.raises(ImageError, match=r"pages-1.img: 4096 bytes, but its pagemap lists 8192"):
        mem.space(1).read(BASE, 8)
    disordered = _checkpoint(tmp_path / "disordered", [(2, 1, PE_PRESENT), (0, 1, PE_PRESENT)], _page(b"") * 2)
    with Memory(disordered) as mem, pytest.raises(ImageError, match="out of order"):
        mem.space(1).read(BASE, 8)
    looped = _checkpoint(tmp_path / "looped", [(0, 1, PE_PRESENT)], _page(b""))
    (looped / "parent").symlink_to(".")
    with pytest.raises(ImageError, match="form a loop"):
        Checkpoint(looped).chain()
    with pytest.raises(ImageError, match="form a loop"):
        Memory(looped)


# -- a real incremental dump (needs the kernel's soft-dirty tracking: the test VM has it) --------


@needs_root
@needs_mem_track
@pytest.mark.criu
@pytest.mark.mem_track
def test_an_incremental_dump_is_read_through_its_parent(tmp_path: Path) -> None:
    """A pre-dump, the tree rewrites REWRITE pages, a dump on top: the dump holds only what
    changed, the rest is read from the pre-dump."""
    with known_tree(tmp_path) as kt:
        (tmp_path / "pre").mkdir()
        (tmp_path / "dump").mkdir()
        pycriu.Criu().pre_dump(pycriu.PreDumpOptions(pid=kt.tree.pid, images_dir=tmp_path / "pre", track_mem=True,
                                                     shell_job=True))
        kt.rewrite()
        pycriu.Criu().dump(pycriu.DumpOptions(pid=kt.tree.pid, images_dir=tmp_path / "dump", track_mem=True,
                                              parent_images="../pre", shell_job=True, leave_running=True))
    with Memory(tmp_path / "dump") as mem:
        space = mem.space(1)
        region = space.mapping_at(kt.base)
        assert region is not None
        # the rewritten pages are in the dump's own files, the others in the pre-dump's
        assert region.pages_images >= REWRITE and region.pages_parent >= PAGES - REWRITE
        whole = space.read(kt.base, PAGES * PAGE_SIZE)
        assert [whole[i * PAGE_SIZE:i * PAGE_SIZE + 8] for i in range(PAGES)] == [
            word(i, rewritten=i < REWRITE) for i in range(PAGES)]
        count, hits = space.find(TAG_BYTES, limit=10_000)
        assert sum(h.address in range(kt.base, kt.base + PAGES * PAGE_SIZE) for h in hits) == PAGES
    # the pre-dump alone holds memory only: it is named so, not taken for a broken checkpoint
    with Memory(tmp_path / "pre") as pre, pytest.raises(ImageError, match="a pre-dump's images"):
        pre.pids()
