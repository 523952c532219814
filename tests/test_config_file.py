"""A runtime's CRIU configuration file (runc's ``org.criu.config``, crun's ``crun.conf``) is
honoured together with pycriu's own options; an option pycriu sets itself, or a value CRIU's
parser would not read back as written, is refused naming the file and the line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_root

import pycriu
from pycriu._config import read_config_file
from pycriu.workload import Workload


def _file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "criu.conf"
    p.write_text(text)
    return p


def test_the_command_line_syntax_is_read(tmp_path: Path) -> None:
    conf = _file(tmp_path, "# runc.conf\n--tcp-established\nghost-limit 1048576\nfile-locks   # comment\n"
                           "manage-cgroups=soft\n\n\tlink-remap\n")
    assert read_config_file(conf) == [("tcp-established", None), ("ghost-limit", "1048576"), ("file-locks", None),
                                      ("manage-cgroups", "soft"), ("link-remap", None)]


@pytest.mark.parametrize(("line", "what"), [
    ("images-dir /tmp/elsewhere", "set by pycriu itself"),
    ("config /etc/other.conf", "set by pycriu itself"),
    ("exec-cmd", "set by pycriu itself"),
    ("tcp-establish", "not one of CRIU 4.2's long options"),
    ("ghost-limit", "needs a value"),
    ("leave-running yes", "is a flag"),
    ('lsm-profile "a b"', "cannot be passed safely"),
])
def test_a_line_that_could_smuggle_an_option_is_refused_by_file_and_line(tmp_path: Path, line: str,
                                                                          what: str) -> None:
    conf = _file(tmp_path, f"tcp-established\n{line}\n")
    with pytest.raises(pycriu.InvalidOptionError, match=f"criu.conf, line 2: .*{what}"):
        pycriu.DumpOptions(pid=1, images_dir=tmp_path, config_file=conf)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(pycriu.InvalidOptionError, match="cannot be read"):
        pycriu.RestoreOptions(images_dir=tmp_path, config_file=tmp_path / "nope.conf")


def test_pycriu_s_own_options_come_after_the_file_s(tmp_path: Path) -> None:
    """CRIU takes the last of a repeated option: what pycriu was told wins over the file."""
    conf = _file(tmp_path, "no-display-stats\n")
    entries = pycriu.DumpOptions(pid=1, images_dir=tmp_path, config_file=conf, display_stats=True).config_entries()
    assert entries.index(("no-display-stats", None)) < entries.index(("display-stats", None))


@needs_root
def test_criu_acts_on_an_option_from_the_file(criu: pycriu.Criu, workload: Callable[..., Workload],
                                               tmp_path: Path) -> None:
    """``leave-running`` from the file: the dumped tree goes on running (CRIU's default kills it)."""
    w = workload(mib=4)
    images = tmp_path / "images"
    images.mkdir()
    conf = _file(tmp_path, "# from the runtime\nleave-running\n")
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=images, config_file=conf))
    assert w.alive(w.pid)
    w.wait_beats(3)
    assert (images / "inventory.img").exists()
