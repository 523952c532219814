"""The pre-flight: before the source freezes, the destination checks that it can give the live
tree what it needs, so that a restore that cannot work ends the migration *before* the downtime
instead of inside it.

The source reads off its live tree (:func:`pycriu.migration.procs.tree_resources`): the regular
files it holds open or maps (executables and libraries included) with their sizes, its listening
TCP ports and the paths its Unix sockets are bound to. The agent answers with one problem per
resource it cannot provide:

* a file that is missing, not a regular file, or of another size (CRIU restores a file only if it
  is the same file: "File ... has bad size");
* a TCP port something already listens on ("Can't bind inet socket: Address already in use");
* a Unix socket path whose directory is missing, or that another process serves (CRIU unlinks
  the path and binds it again: the other server would lose it);
* a CPU that lacks what the source's CPU offers the tree: the source sends the image of ``criu
  cpuinfo dump`` and the agent runs ``criu cpuinfo check`` on it, as CRIU's restore would
  (``--cpu-cap``, FPU features by default), but before the freeze.

On one host the files are the source's own and the ports and paths are held by the source itself
(:func:`pycriu.migration.handshake.checks_and_handshake` deals with those), so a local
agent checks nothing. No CRIU tool does this.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import first_error_line
from .errors import ProtocolError
from .procs import TreeResources

__all__ = ["request", "problems", "cpuinfo_image", "cpu_problem", "MAX_ENTRIES", "MAX_CPUINFO"]

#: At most this many resources of each kind in one request (a tree with more is refused).
MAX_ENTRIES = 100_000
#: Largest ``cpuinfo.img`` accepted (one entry per CPU model: about 100 bytes here).
MAX_CPUINFO = 64 << 10


def request(resources: TreeResources, cpuinfo: bytes | None = None) -> dict[str, Any]:
    """The ``preflight`` message for ``resources`` (and this host's ``cpuinfo.img``)."""
    msg: dict[str, Any] = {"type": "preflight",
                           "files": [{"path": p, "size": n} for p, n in sorted(resources.files.items())],
                           "tcp_ports": sorted(resources.tcp_ports), "unix_paths": sorted(resources.unix_paths)}
    if cpuinfo is not None:
        msg["cpuinfo"] = base64.b64encode(cpuinfo).decode()
    return msg


def cpuinfo_image(criu_binary: str, timeout: float = 30.0) -> bytes | None:
    """This host's CPU as CRIU describes it (``criu cpuinfo dump``), None if CRIU cannot say."""
    with tempfile.TemporaryDirectory(prefix="pycriu-cpuinfo-") as d:
        try:
            proc = subprocess.run([criu_binary, "cpuinfo", "dump", "-D", d, "-W", d, "-o", "cpuinfo.log"],
                                  capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.SubprocessError):
            return None  # the agent then checks no CPU; CRIU's restore still does
        image = Path(d) / "cpuinfo.img"
        return image.read_bytes() if proc.returncode == 0 and image.is_file() else None


def cpu_problem(criu_binary: str, encoded: str, work: Path, timeout: float = 30.0) -> str | None:
    """Whether the source's CPU (its ``cpuinfo.img``, base64) can be matched here: ``criu cpuinfo
    check`` in a directory of ``work``; the problem, or None."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ProtocolError("preflight.cpuinfo: not base64") from None
    if len(data) > MAX_CPUINFO:
        raise ProtocolError(f"preflight.cpuinfo: larger than {MAX_CPUINFO} bytes")
    with tempfile.TemporaryDirectory(prefix="cpuinfo-", dir=work) as d:
        (Path(d) / "cpuinfo.img").write_bytes(data)
        proc = subprocess.run([criu_binary, "cpuinfo", "check", "-D", d, "-W", d, "-o", "cpuinfo-check.log"],
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode == 0:
            return None
        said = first_error_line(Path(d) / "cpuinfo-check.log") or f"exit status {proc.returncode}"
    return (f"the destination's CPU does not offer what the source's CPU gives the tree (criu cpuinfo check: "
            f"{said})")


def problems(msg: dict[str, Any], *, same_host: bool) -> list[str]:
    """What this host cannot provide of a ``preflight`` message; malformed entries are a
    :class:`ProtocolError`."""
    files = _entries(msg, "files", dict)
    ports = _entries(msg, "tcp_ports", int)
    paths = _entries(msg, "unix_paths", str)
    for entry in files:
        if set(entry) != {"path", "size"} or not isinstance(entry["path"], str) \
                or not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 0:
            raise ProtocolError("preflight.files: expected {path: str, size: int >= 0} entries")
        _absolute(entry["path"], "files")
    for port in ports:
        if isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError(f"preflight.tcp_ports: {port!r} is not a TCP port")
    for path in paths:
        _absolute(path, "unix_paths")
    if same_host:
        return []
    found = [p for p in (_file_problem(e["path"], e["size"]) for e in files) if p]
    found += [p for p in (_port_problem(port) for port in ports) if p]
    found += [p for p in (_unix_problem(path) for path in paths) if p]
    return found


def _entries(msg: dict[str, Any], key: str, kind: type) -> list[Any]:
    items = msg.get(key)
    if not isinstance(items, list) or len(items) > MAX_ENTRIES or not all(isinstance(i, kind) for i in items):
        raise ProtocolError(f"preflight.{key}: expected a list of at most {MAX_ENTRIES} {kind.__name__} entries")
    return items


def _absolute(path: str, key: str) -> None:
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ProtocolError(f"preflight.{key}: {path[:100]!r} is not an absolute path")


def _file_problem(path: str, size: int) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: missing on the destination (the tree holds it open or maps it; {size} bytes on the source)"
    except OSError as exc:
        return f"{path}: cannot be read on the destination ({os.strerror(exc.errno or 0)})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file on the destination"
    if st.st_size != size:
        return (f"{path}: {st.st_size} bytes on the destination, {size} on the source (CRIU restores a file only "
                "if it is the same file)")
    return None


def _port_problem(port: int) -> str | None:
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as CRIU restores it
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"TCP port {port}: already in use on the destination (the tree listens on it)"
            if exc.errno != errno.EAFNOSUPPORT:
                return f"TCP port {port}: cannot be bound on the destination ({os.strerror(exc.errno or 0)})"
    return None


def _unix_problem(path: str) -> str | None:
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        return f"{path}: its directory {parent} is missing on the destination (the tree's Unix socket is bound there)"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        try:
            probe.connect(path)
        except OSError:
            return None  # nothing serves it: CRIU may take the path
    return f"{path}: another process serves this Unix socket path on the destination"
