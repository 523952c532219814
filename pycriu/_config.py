"""CRIU configuration files: the channel for options libcriu has no setter for.

CRIU 4.2 reads ``criu_opts.config_file`` in RPC mode after the RPC options, so every long option
of the ``criu`` command line can be given there. CRIU's config parser (``criu/config.c``) splits a
line at the first blank, cuts everything after ``#``, and treats quotes and backslashes specially;
it has no escape for a newline. So instead of quoting, values are restricted to characters that
the parser passes through unchanged, and anything else is refused: an option value can never
inject a second option or change the meaning of the line.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .errors import InvalidOptionError

_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
# Printable, no blank, no '#', no quote, no backslash: what CRIU's parser keeps verbatim.
_VALUE = re.compile(r'^[^\s#"\\\x00-\x1f\x7f]+$')

# Options that would change what the config channel itself means, or what pycriu owns.
_FORBIDDEN = frozenset({"config", "no-default-config", "images-dir", "work-dir", "log-file", "output",
                        "pid", "tree", "status-fd", "daemon", "pidfile"})


def check_config_key(key: str) -> None:
    """Refuse anything but a plain CRIU long-option name."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidOptionError(
            f"CRIU option name {key!r} is invalid: use the long option without dashes, "
            "for example 'tcp-established'")
    if key in _FORBIDDEN:
        raise InvalidOptionError(f"CRIU option {key!r} is set by pycriu itself; use the typed option instead")


def check_config_value(key: str, value: str) -> None:
    """Refuse a value that CRIU's config parser would not read back exactly as given."""
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise InvalidOptionError(
            f"value {value!r} of CRIU option {key!r} cannot be passed safely: it must be non-empty "
            "and contain no whitespace, newline, '#', quote, backslash or control character")


def render(entries: Sequence[tuple[str, str | None]]) -> str:
    """The config file text for ``(option, value or None)`` entries, each checked again."""
    lines = []
    for key, value in entries:
        check_config_key(key)
        if value is None:
            lines.append(key)
        else:
            check_config_value(key, value)
            lines.append(f"{key} {value}")
    return "".join(line + "\n" for line in lines)


@contextmanager
def config_file(entries: Sequence[tuple[str, str | None]]) -> Iterator[str | None]:
    """Write a private (0600) CRIU config file for ``entries``; yield its path and remove it.

    Yields ``None`` when there is nothing to write, so no config file is sent at all.
    """
    if not entries:
        yield None
        return
    text = render(entries)
    fd, path = tempfile.mkstemp(prefix="pycriu-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        yield path
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
