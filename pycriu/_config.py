"""CRIU configuration files: the channel for options libcriu has no setter for.

CRIU 4.2 reads ``criu_opts.config_file`` in RPC mode after the RPC options, so every long option
of the ``criu`` command line can be given there. CRIU's config parser (``criu/config.c``) turns a
line ``name value`` into two argv words and hands them to ``getopt_long``; it cuts everything
after ``#``, treats quotes and backslashes specially, and has no escape for a newline.

Three rules make the channel safe, so that an option value can never inject a second option:

* names must be exactly one of CRIU's long options (:data:`CRIU_OPTIONS`); getopt would also take
  an unambiguous prefix (``image`` for ``images-dir``), which is how a check on names alone could
  be bypassed;
* a value is written as one word, ``name=value``, so getopt binds it to its option: a value given
  to a flag is an error, never a separate argv word such as ``--leave-running``;
* values are restricted to characters CRIU's parser passes through unchanged.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .errors import InvalidOptionError

# CRIU 4.2's long options (criu/config.c), by argument kind. "bool" options also have "no-NAME".
_FLAGS = ("leave-stopped leave-running help version ms exec-cmd enable-external-sharing "
          "enable-external-masters lazy-pages all no-default-config tls-no-cn-verify").split()
_BOOLS = ("restore-detached restore-sibling daemon tcp-established log-pid evasive-devices link-remap "
          "shell-job file-locks page-server track-mem auto-dedup force-irmap extra experimental "
          "skip-in-flight deprecated display-stats weak-sysctls tcp-close stream tls skip-file-rwx-check "
          "mntns-compat-mode unprivileged ghost-fiemap allow-uprobes").split()
_OPTIONAL = "ext-unix-sk cpu-cap manage-cgroups verbosity".split()
_REQUIRED = ("tree images-dir work-dir log-file join-ns root close pidfile veth-pair action-script address "
             "port prev-images-dir libdir ext-mount-map cgroup-root inherit-fd feature skip-mnt enable-fs "
             "freeze-cgroup ghost-limit irmap-scan-path lsm-profile timeout external empty-ns cgroup-props "
             "cgroup-props-file cgroup-dump-controller status-fd ps-socket config tls-cacert tls-cacrl "
             "tls-cert tls-key cgroup-yard pre-dump-mode file-validation lsm-mount-context "
             "network-lock").split()

#: CRIU's long options and whether each takes a value: "no", "optional" or "required".
CRIU_OPTIONS: dict[str, str] = {
    **{name: "no" for name in _FLAGS},
    **{name: "no" for name in _BOOLS},
    **{"no-" + name: "no" for name in _BOOLS},
    **{name: "optional" for name in _OPTIONAL},
    **{name: "required" for name in _REQUIRED},
}

# Options that would change what the config channel itself means, what pycriu owns (directories,
# log, target, worker), or that make CRIU do something other than the requested operation.
_FORBIDDEN = frozenset({"config", "no-default-config", "images-dir", "work-dir", "log-file", "tree",
                        "status-fd", "ps-socket", "daemon", "no-daemon", "restore-detached",
                        "no-restore-detached", "pidfile", "help", "version", "stream", "no-stream",
                        "exec-cmd", "ms", "feature", "all"})

# Printable, no blank, no '#', no quote, no backslash: what CRIU's parser keeps verbatim.
_VALUE = re.compile(r'[^\s#"\\\x00-\x1f\x7f]+')


def check_config_key(key: str) -> None:
    """Refuse anything but the exact name of a CRIU long option that pycriu does not own."""
    if not isinstance(key, str) or key not in CRIU_OPTIONS:
        raise InvalidOptionError(
            f"CRIU option name {key!r} is not one of CRIU 4.2's long options: give the full name "
            "without dashes, for example 'tcp-established'")
    if key in _FORBIDDEN:
        raise InvalidOptionError(f"CRIU option {key!r} is set by pycriu itself or changes the operation; "
                                 "use the typed option instead")


def check_config_value(key: str, value: str) -> None:
    """Refuse a value that CRIU's config parser would not read back exactly as given."""
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise InvalidOptionError(
            f"value {value!r} of CRIU option {key!r} cannot be passed safely: it must be non-empty "
            "and contain no whitespace, newline, '#', quote, backslash or control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptionError(f"value {value!r} of CRIU option {key!r} is not valid text") from None


def check_config_entry(key: str, value: str | None) -> None:
    """Check a whole ``(option, value or None)`` entry: the name, the value, and that a value is
    given exactly when the option takes one."""
    check_config_key(key)
    kind = CRIU_OPTIONS[key]
    if value is None:
        if kind == "required":
            raise InvalidOptionError(f"CRIU option {key!r} needs a value")
        return
    if kind == "no":
        raise InvalidOptionError(f"CRIU option {key!r} is a flag and takes no value: pass True")
    check_config_value(key, value)


def read_config_file(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """The entries of a CRIU configuration file written for the ``criu`` command (runc's
    ``org.criu.config``, crun's ``crun.conf``): one option per line, ``name``, ``name value`` or
    ``name=value``, with or without the leading ``--``; ``#`` starts a comment. Every entry
    passes the same checks as ``criu_options``: an option pycriu sets itself, or a value CRIU's
    parser would not read back as written, is refused naming the file and line."""
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - small, read whole
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptionError(f"CRIU config file {os.fspath(path)!r} cannot be read: {exc}") from None
    entries: list[tuple[str, str | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        word, _, rest = line.partition(" ") if " " in line or "\t" not in line else line.partition("\t")
        if "=" in word:
            word, _, inline = word.partition("=")
            rest = f"{inline} {rest}"
        key, value = word.removeprefix("--"), rest.strip() or None
        try:
            check_config_entry(key, value)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{os.fspath(path)}, line {number}: {exc.message}",
                                     hint="remove the line, or use pycriu's typed option for it") from None
        entries.append((key, value))
    return entries


def render(entries: Sequence[tuple[str, str | None]]) -> str:
    """The config file text for ``(option, value or None)`` entries, each checked again."""
    lines = []
    for key, value in entries:
        check_config_entry(key, value)
        lines.append(key if value is None else f"{key}={value}")
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
