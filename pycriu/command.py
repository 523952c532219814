"""The ``pycriu`` command's entry point: hands each subcommand to the module that runs it.

The image commands (``inspect``, ``diff``) read files only: they start without libcriu's binding,
the option classes or the migration layer, whose loading would be most of their time.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: subcommands that read images only (pycriu.inspect.cli)
IMAGE_COMMANDS = frozenset({"inspect", "diff"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pycriu`` command; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args if a != "--json"), None)
    module = "pycriu.inspect.cli" if first in IMAGE_COMMANDS else "pycriu.cli"
    return int(importlib.import_module(module).main(args))
