"""The argument parser every ``pycriu`` subcommand uses."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["SubcommandParser"]


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: also accepts the top-level ``--criu`` and ``--json``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--criu", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
