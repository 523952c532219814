"""Sphinx configuration of the pycriu documentation (built by ``make docs`` with -W)."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

# Document this checkout, whichever pycriu the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pycriu  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

project = "pycriu"
author = "pycriu contributors"
copyright = "pycriu contributors"
release = pycriu.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the Google-style "Attributes:" section of CriuError
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"pycriu {release}"
html_theme_options = {
    "description": "Checkpoint, restore and live-migrate Linux process trees with CRIU, from Python",
    "fixed_sidebar": True,
}


# --- Option fields ------------------------------------------------------------------------------
# DumpOptions, PreDumpOptions and RestoreOptions have dozens of fields. Each field's metadata in
# pycriu/options.py says how it reaches CRIU (a libcriu setter or the CRIU config file) and, for
# some, what it means; list them all as parameters so the reference follows the code.

# Descriptions for fields whose metadata carries none and whose libcriu setter says little.
_FIELD_DOCS = {
    "images_dir": "directory of the image files (must exist)",
    "pid": "root of the process tree to dump",
    "ext_mounts": "external mounts (``--ext-mount-map``), as ``ExternalMount`` records",
    "inherit_fds": "descriptors handed to the restored tree (``--inherit-fd``), as ``InheritFd`` records",
    "veth_pairs": "veth pairs to restore (``--veth-pair``), as ``VethPair`` records",
    "cgroup_roots": "cgroup roots to restore under (``--cgroup-root``), as ``CgroupRoot`` records",
    "join_ns": "existing namespaces to restore into (``--join-ns``), as ``JoinNamespace`` records",
    "pidfd_store_sk": "socket of CRIU's pidfd store",
}


def _channel(via: Any) -> str:
    setter = getattr(via, "setter", None)
    config = getattr(via, "config", None)
    if setter:
        each = " (once per item)" if getattr(via, "kind", None) in ("strs", "ints") else ""
        return f"Sent with ``criu_local_{setter}``{each}."
    if config:
        return f"Sent as ``{config}`` in the CRIU config file."
    return ""


def _type_text(hint: Any) -> str:
    """The field's type, with pycriu's classes named as the package exports them (so they link)."""
    return re.sub(r"~pycriu\.\w+\.", "~pycriu.", stringify_annotation(hint, "smart"))


def _document_option_fields(app: Any, what: str, name: str, obj: Any, options: Any,
                            lines: list[str]) -> None:
    if what != "class" or not isinstance(obj, type) or not dataclasses.is_dataclass(obj):
        return
    fields = dataclasses.fields(obj)
    if not any("via" in f.metadata for f in fields):
        return
    hints = typing.get_type_hints(obj)
    required = [f for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    lines.append("")
    for f in required + [f for f in fields if f not in required]:
        doc = f.metadata.get("doc") or _FIELD_DOCS.get(f.name, "")
        text = " ".join(part for part in (doc + "." if doc else "", _channel(f.metadata.get("via"))) if part)
        lines.append(f":param {f.name}: {text}".rstrip())
        if f.name in hints:
            lines.append(f":type {f.name}: {_type_text(hints[f.name])}")
    lines.append("")


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _document_option_fields)
