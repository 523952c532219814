"""Sphinx configuration of the pycriu documentation (built by ``make docs`` with -W)."""

from __future__ import annotations

import sys
from pathlib import Path

# Document this checkout, whichever pycriu the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pycriu  # noqa: E402

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

# Signatures stay readable: type hints go into the descriptions, not the signatures.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"pycriu {release}"
html_theme_options = {
    "description": "Checkpoint, restore and live-migrate Linux process trees with CRIU, from Python",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
