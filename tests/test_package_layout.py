"""The package's shape, pinned: the public names of ``pycriu.migration`` (as python-zstandard
pins its module attributes), and no import cycle between pycriu's modules. No root needed."""

from __future__ import annotations

import ast
from pathlib import Path

import pycriu.migration

PACKAGE = Path(pycriu.__file__).parent

#: The user API of pycriu.migration. A change here is a change of the public API: say so in the
#: docs and the release notes, then update this list.
MIGRATION_API = [
    "Migration", "MigrationReport", "Outcome", "Phase", "Progress", "MODES", "PreCopyPolicy", "PreCopyDecision",
    "TLSConfig", "Destination", "MigrationError", "PreflightError", "AgentError", "AuthenticationError",
    "ProtocolError", "NoSpaceError",
    "TransportError", "AgentConfig", "serve_stdio", "serve_tcp", "PROTOCOL_VERSION",
]


def test_the_migration_api_is_exactly_the_pinned_list() -> None:
    assert sorted(pycriu.migration.__all__) == sorted(MIGRATION_API)


def test_every_public_name_resolves() -> None:
    for name in MIGRATION_API:
        assert getattr(pycriu.migration, name) is not None, name


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports_at_load(path: Path, module: str) -> set[str]:
    """Every pycriu module ``module`` imports, anywhere: at the top, under ``TYPE_CHECKING``
    and inside functions. A cycle hidden behind a type-only or a deferred import is still two
    modules that each need the other (flows.py and migration.py were one)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in [tree]:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("pycriu")}
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (sub.level - 1)]
                    target = ".".join(base + ([sub.module] if sub.module else []))
                else:
                    target = sub.module or ""
                if not target.startswith("pycriu"):
                    continue
                found.add(target)
                for alias in sub.names:  # ``from . import procs``: a module, not a name
                    candidate = f"{target}.{alias.name}"
                    if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                            (PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").exists():
                        found.add(candidate)
    return found


def test_no_module_imports_itself_back() -> None:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        graph[module] = {m for m in _imports_at_load(path, module) if m != module}
    for module in graph:  # a parent package is loaded before its modules: not an edge that cycles
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
