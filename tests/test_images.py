"""pycriu.images: CRIU's image files as data, read and written as CRIU and ``crit`` do.

Real dumps of a tree that holds one of many kinds of state (threads, a pipe and a socket with
queued data, a TCP connection, a deleted file, System V IPC) are decoded and encoded again: the
bytes come back the same, and the dicts are the ones CRIU's own Python module (``crit``'s) makes
of the same files. Hostile files raise a typed error. The first tests need no root.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import needs_root
from image_support import assert_round_trips, image_files

import pycriu
from pycriu import images
from pycriu.images import convert, magic
from pycriu.images.errors import ImageError, MagicException
from pycriu.images.schema import message_class
from pycriu.workload import PidNamespaceTree

#: CRIU's own Python module, built by provisioning with CRIU (the oracle for the dicts)
CRIU_LIB = Path(os.environ.get("PYCRIU_CRIU_SRC", "/var/cache/pycriu/build/criu-4.2.1")) / "lib"


def _image(name: str, *messages: object, payload: bytes = b"") -> bytes:
    out = io.BytesIO()
    if name != "INVENTORY":
        out.write(struct.pack("<I", magic.IMG_COMMON))
    out.write(struct.pack("<I", magic.by_name[name]))
    for m in messages:
        data = m.SerializeToString()  # type: ignore[attr-defined]
        out.write(struct.pack("<I", len(data)) + data)
    return out.getvalue() + payload


# -- no root ---------------------------------------------------------------------------------------

def test_a_vma_reads_as_crit_shows_it_plain_and_pretty() -> None:
    vma = message_class("vma_entry")(start=0x400000, end=0x401000, pgoff=0, shmid=0, prot=5, flags=0x22,
                                     status=0x201, fd=-1)
    plain = images.loads(_image("VMAS", vma))
    assert plain["magic"] == "VMAS" and plain["entries"][0]["prot"] == 5
    pretty = images.loads(_image("VMAS", vma), pretty=True)["entries"][0]
    assert pretty["start"] == "0x400000" and pretty["prot"] == "PROT_READ | PROT_EXEC"
    assert pretty["flags"] == "MAP_PRIVATE | MAP_ANON" and pretty["status"] == "VMA_AREA_REGULAR | VMA_ANON_PRIVATE"
    for img in (plain, images.loads(_image("VMAS", vma), pretty=True)):
        assert images.dumps(img) == _image("VMAS", vma)  # both forms encode back to the same bytes


def test_addresses_devices_and_bytes_convert_both_ways() -> None:
    sk = message_class("inet_sk_entry")(id=1, ino=2, family=2, type=1, proto=6, state=10, src_port=8080,
                                        dst_port=0, flags=0, backlog=5, src_addr=[0x0100007F], dst_addr=[0])
    d = convert.to_dict(sk, pretty=True)
    assert d["src_addr"] == ["127.0.0.1"] and d["state"] == "LISTEN" and d["family"] == "INET"
    assert convert.from_dict(d, message_class("inet_sk_entry")()) == sk
    reg = message_class("reg_file_entry")(id=1, flags=0o2, pos=0, name="/x")
    assert convert.to_dict(reg, pretty=True)["flags"] == "O_RDWR"
    data = message_class("pipe_data_entry")(pipe_id=3, bytes=5)
    img = images.loads(_image("PIPES_DATA", data, payload=b"hello"))
    assert base64.b64decode(img["entries"][0]["extra"]) == b"hello"
    assert images.loads(_image("PIPES_DATA", data, payload=b"hello"), nopl=True)["entries"][0]["extra"] == "... <5B>"


def test_info_names_the_type_and_counts_entries() -> None:
    head = message_class("pagemap_head")(pages_id=1)
    pe = message_class("pagemap_entry")(vaddr=0x1000, compat_nr_pages=0, nr_pages=2)
    assert images.info(io.BytesIO(_image("PAGEMAP", head, pe, pe))) == {"magic": "PAGEMAP", "count": 2}


@pytest.mark.parametrize("data, what", [
    (b"", "too short"),
    (struct.pack("<I", 0x12345678), "not a CRIU image magic"),
    (struct.pack("<II", magic.IMG_COMMON, magic.by_name["CORE"]) + struct.pack("<I", 1000) + b"x" * 10,
     "only 10 left"),
    (struct.pack("<II", magic.IMG_COMMON, magic.by_name["CORE"]) + struct.pack("<I", 0xFFFFFFF0), "absurd"),
    (struct.pack("<II", magic.IMG_COMMON, magic.by_name["CORE"]) + struct.pack("<I", 3) + b"\xff\xff\xff",
     "does not parse"),
    (struct.pack("<II", magic.IMG_COMMON, magic.by_name["PIPES_DATA"]) + struct.pack("<I", 4) + b"\x08\x01\x10\x7f",
     "only 0 left"),
    (struct.pack("<II", magic.IMG_COMMON, magic.by_name["CORE"]) + b"\x01\x00", "truncated length"),
])
def test_a_hostile_image_is_a_typed_error(data: bytes, what: str) -> None:
    with pytest.raises(ImageError, match=what):
        images.loads(data)


def test_an_unknown_magic_keeps_its_number_as_crits_module_does() -> None:
    with pytest.raises(MagicException) as e:
        images.loads(struct.pack("<II", magic.IMG_COMMON, 0x0BADF00D))
    assert e.value.magic == 0x0BADF00D


def test_a_bad_dict_names_the_field() -> None:
    with pytest.raises(ImageError, match="has no field 'nonsense'"):
        images.dumps({"magic": "PSTREE", "entries": [{"pid": 1, "nonsense": 2}]})
    with pytest.raises(ImageError, match="pstree_entry.pid: 'one' is not a number"):
        images.dumps({"magic": "PSTREE", "entries": [{"pid": "one"}]})
    with pytest.raises(ImageError, match="not an image type"):
        images.dumps({"magic": "PAGES", "entries": []})


# -- real dumps (root, real CRIU) ------------------------------------------------------------------

#: A tree holding a bit of everything with a payload: a thread, a pipe and a Unix socket with
#: queued data, a TCP connection with data both ways, a deleted file it still holds, and System
#: V shared memory, a semaphore set and a message queue (its own IPC namespace holds them).
STATEFUL = textwrap.dedent("""
    import ctypes, os, socket, sys, threading, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    r, w = os.pipe(); os.write(w, b"pipe data")
    a, b = socket.socketpair(); a.send(b"unix queue")
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    cli = socket.create_connection(srv.getsockname()); acc, _ = srv.accept()
    cli.send(b"to server"); acc.send(b"to client")
    ghost = open("ghost", "w+b"); ghost.write(b"deleted but open" * 100); ghost.flush(); os.unlink("ghost")
    shm = libc.shmget(0x5A1, 8192, 0o1600); addr = libc.shmat(shm, None, 0)
    ctypes.memmove(addr, b"shared", 6)
    sem = libc.semget(0x5A2, 3, 0o1600)
    msq = libc.msgget(0x5A3, 0o1600)
    class Msg(ctypes.Structure):
        _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 16)]
    libc.msgsnd(msq, ctypes.byref(Msg(7, b"queued message")), 16, 0)
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
    open("ready", "w").close()
    time.sleep(1000)
""")


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images of one dump of STATEFUL (CRIU's CLI, as a user's checkpoint would be made)."""
    if os.geteuid() != 0:
        pytest.skip("not root: checkpoint/restore needs CAP_SYS_ADMIN")
    work = tmp_path_factory.mktemp("stateful")
    (work / "stateful.py").write_text(STATEFUL)
    tree = PidNamespaceTree([sys.executable, "stateful.py"], cwd=work, prefix=["unshare", "--ipc"])
    try:
        deadline = time.monotonic() + 10
        while not (work / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (work / "ready").exists(), "the stateful tree did not start"
        d = work / "images"
        d.mkdir()
        pycriu.Criu().dump(pycriu.DumpOptions(pid=tree.pid, images_dir=d, log_file="dump.log", shell_job=True,
                                              tcp_established=True, leave_running=True))
        return d
    finally:
        tree.close()


@needs_root
@pytest.mark.criu
def test_every_image_of_a_dump_decodes_and_encodes_back_to_its_bytes(dump: Path) -> None:
    kinds = assert_round_trips(dump)
    # the payload-carrying kinds were all there to be tested
    assert {"PIPES_DATA", "SK_QUEUES", "TCP_STREAM", "GHOST_FILE", "IPCNS_SHM", "IPCNS_SEM", "IPCNS_MSG",
            "CORE", "PSTREE", "PAGEMAP", "FILES", "STATS"} <= kinds, kinds  # sockets are in FILES


@needs_root
@pytest.mark.criu
def test_the_payloads_hold_what_the_tree_had(dump: Path) -> None:
    def entries(prefix: str) -> list[dict[str, object]]:
        return [e for p in image_files(dump) if p.name.startswith(prefix)
                for e in images.loads(p.read_bytes())["entries"]]

    def data(extra: object) -> bytes:
        return base64.b64decode(str(extra))

    assert any(data(e["extra"]) == b"pipe data" for e in entries("pipes-data"))
    assert any(data(e["extra"]) == b"unix queue" for e in entries("sk-queues"))
    tcp = [e["extra"] for e in entries("tcp-stream")]
    assert any(data(x["inq"]) == b"to server" for x in tcp) and any(data(x["inq"]) == b"to client" for x in tcp)  # type: ignore[index]
    assert any(data(e["extra"]).startswith(b"deleted but open") for e in entries("ghost-file") if "extra" in e)
    # CRIU 4 keeps a segment's contents with the other pages (in_pagemaps): no payload then
    assert all(e.get("in_pagemaps") or data(e["extra"]).startswith(b"shared") for e in entries("ipcns-shm"))
    assert any(e["extra"] == [0, 0, 0] for e in entries("ipcns-sem"))
    msgs = [e["extra"] for e in entries("ipcns-msg")]
    assert any(data(m[1]).startswith(b"queued message") and m[0]["mtype"] == 7 for m in msgs)  # type: ignore[index]


@needs_root
@pytest.mark.criu
@pytest.mark.skipif(not (CRIU_LIB / "pycriu" / "images" / "pb.py").exists(),
                    reason=f"CRIU's own Python module is not built at {CRIU_LIB} (scripts/provision.sh builds it)")
def test_the_dicts_are_those_of_crits_own_module(dump: Path) -> None:
    """CRIU's module, in a process of its own (it registers its schemas in protobuf's default
    pool and is named pycriu too), decodes every image; ours must give the same dicts."""
    oracle = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(CRIU_LIB)!r})
        import pycriu.images as I
        out = {{}}
        for p in sys.argv[1:]:
            out[p] = [I.load(open(p, "rb"), pretty) for pretty in (False, True)]
        print(json.dumps(out))
    """)
    paths = [str(p) for p in image_files(dump)]
    r = subprocess.run([sys.executable, "-c", oracle, *paths], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    for p in paths:
        ours = [json.loads(json.dumps(images.load(open(p, "rb"), pretty))) for pretty in (False, True)]
        assert ours == theirs[p], Path(p).name


def test_a_file_opened_in_text_mode_is_read_as_bytes(tmp_path: Path) -> None:
    """zdtm's hooks open images with a bare open(), as CRIU's module let them."""
    path = tmp_path / "pstree.img"
    path.write_bytes(_image("PSTREE", message_class("pstree_entry")(pid=1, ppid=0, pgid=1, sid=1)))
    with open(path) as f:
        assert images.load(f)["entries"] == [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1}]


CRIT = CRIU_LIB.parent / "crit" / "crit"


@needs_root
@pytest.mark.criu
@pytest.mark.skipif(not (CRIT / "__main__.py").exists() or not (CRIU_LIB / "pycriu" / "images" / "pb.py").exists(),
                    reason=f"CRIU's crit or its Python module is not in the provisioned source ({CRIT.parent})")
@pytest.mark.parametrize("command", [["x", "{d}", "ps"], ["x", "{d}", "fds"], ["x", "{d}", "mems"], ["x", "{d}", "rss"],
                                     ["info", "{d}/pagemap-1.img"], ["decode", "--pretty", "-i", "{d}/files.img"]])
def test_crit_runs_on_our_module_and_prints_what_it_prints_on_criu_s(dump: Path, tmp_path: Path,
                                                                     command: list[str]) -> None:
    """CRIU's own crit, unchanged, with ``import pycriu`` finding ours, then CRIU's module."""
    shutil.copytree(CRIT, tmp_path / "crit")
    (tmp_path / "crit" / "version.py").write_text('__version__ = "test"\n')  # what crit's build writes
    argv = [sys.executable, "-m", "crit", *(a.format(d=dump) for a in command)]
    our_env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    their_env = {**os.environ, "PYTHONPATH": f"{CRIU_LIB}:{tmp_path}"}
    which = [sys.executable, "-c", "import pycriu; print(pycriu.__file__)"]
    # run outside the checkout: its pycriu/ would come first on sys.path for both
    assert subprocess.run(which, capture_output=True, text=True, cwd=tmp_path,
                          env=their_env).stdout.startswith(str(CRIU_LIB))
    ours = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=our_env)
    theirs = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=their_env)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout and ours.stdout.strip()


def test_raw_files_are_told_from_images_by_name() -> None:
    """CRIU's raw files (magic.h's RAW_IMAGE_MAGIC aliases) have no magic to read."""
    for raw in ("pages-1.img", "ifaddr-10.img", "route6-10.img", "iptables-10.img", "tmpfs-dev-42.tar.gz.img",
                "netns-ct-10.img"):
        assert magic.is_raw(raw), raw
    for image in ("pagemap-1.img", "pagemap-shmem-83313.img", "core-1.img", "tty-data.img", "netns-10.img"):
        assert not magic.is_raw(image), image
