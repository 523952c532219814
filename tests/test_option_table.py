"""docs/options.rst, the table of every option and the test that shows CRIU acted on it, stays
complete and true: every field of every options class has a row, and every test it names
exists. No root needed."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pycriu

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "options.rst"
CRIU_OPTION_CLASSES = (pycriu.DumpOptions, pycriu.PreDumpOptions, pycriu.RestoreOptions)
DAEMON_OPTION_CLASSES = (pycriu.PageServerOptions, pycriu.LazyPagesOptions)


def _rows() -> dict[str, str]:
    text = TABLE.read_text()
    return dict(re.findall(r"^   \* - ``([\w.]+)``\n     - (.+)$", text, re.M))


def test_every_option_of_every_class_has_a_row() -> None:
    rows = _rows()
    wanted = {f.name for cls in CRIU_OPTION_CLASSES for f in dataclasses.fields(cls)}
    wanted |= {f"{cls.__name__}.{f.name}" for cls in DAEMON_OPTION_CLASSES for f in dataclasses.fields(cls)}
    assert sorted(wanted - set(rows)) == [], "options missing from docs/options.rst"
    assert sorted(set(rows) - wanted) == [], "rows for options that do not exist"


def test_every_test_named_exists() -> None:
    for option, cell in _rows().items():
        if cell.startswith("not yet: "):
            assert len(cell) > len("not yet: ") + 10, f"{option}: say why no test shows it yet"
            continue
        for node in cell.split("; "):  # an option both halves take may name a test of each
            match = re.fullmatch(r"``(tests/\w+\.py)::(test_\w+)``", node)
            assert match, f"{option}: {node!r} is neither a test node id nor 'not yet: <why>'"
            path, name = ROOT / match.group(1), match.group(2)
            names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{option}: {match.group(1)} has no {name}"


def test_the_counts_on_the_page_are_the_table_s() -> None:
    rows = _rows()
    not_yet = sum(cell.startswith("not yet: ") for cell in rows.values())
    assert f"{len(rows) - not_yet} rows are shown by a test; {not_yet} are not yet." in TABLE.read_text()
