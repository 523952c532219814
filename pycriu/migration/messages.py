"""The agent protocol's messages: every type and its typed fields (:data:`MESSAGES`), who may send
which, the one validator, JSON encoding without NaN or duplicate keys, and the names a session
accepts for its files and directories (see :mod:`.protocol` for the whole protocol)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import AgentError, NoSpaceError, ProtocolError

PROTOCOL_VERSION = 1

#: CRIU image file names: lowercase words joined by '-' or '_', dot-separated parts, ``.img`` at
#: the end (``pages-1.img``, ``tmpfs-dev-42.tar.gz.img``). No '/', no '..', no empty part, no
#: leading dot, at most 128 characters.
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}(?:\.[a-z0-9_-]{1,31}){0,4}\.img")
#: CRIU log file names the agent sends back.
LOG_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}\.log")
#: CRIU's page images (what a page server writes), the only files ``page-images`` hands back.
PAGE_IMAGE = re.compile(r"(?:pagemap|pagemap-shmem|pages)-[0-9]{1,10}\.img")
#: Directories inside a session: the final images, and one per pre-dump iteration.
DIR_NAME = re.compile(r"images|pre-[1-9][0-9]{0,3}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FLAG_NAME = re.compile(r"[a-z][a-z_]{0,31}")


def agent_error(msg: Mapping[str, Any]) -> AgentError:
    """The agent's ``error`` message (validated) as the exception the source raises."""
    if msg["code"] == "no-space":
        return NoSpaceError(f"the agent reported: {msg['message']}")
    return AgentError(f"the agent reported: {msg['message']}", code=msg["code"])


def check_image_name(name: Any, pattern: re.Pattern[str] = IMAGE_NAME) -> str:
    """Return ``name`` if it is an allowed file name, else raise :class:`ProtocolError`."""
    if not isinstance(name, str) or len(name) > 128 or not pattern.fullmatch(name):
        raise ProtocolError(f"refused file name {name!r}: not an allowed image name "
                            "(no '/', no '..', no absolute path; lowercase CRIU image names only)")
    return name


def check_dir_name(name: Any) -> str:
    if not isinstance(name, str) or not DIR_NAME.fullmatch(name):
        raise ProtocolError(f"refused directory name {name!r}: use 'images' or 'pre-N'")
    return name


# --- Message schemas ---------------------------------------------------------------------------

# A field spec is (python type(s), required). ``dict`` specs nest. "?" in a type tuple allows None.
_Opt = type(None)
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_BOOL = (bool,)
_FEATURES = {"lazy_pages": (_BOOL, True), "mem_track": (_BOOL, True)}
_ADDRESS = {"address": (_STR, True), "port": (_INT, True)}
_VERSIONS = {"protocol": (_INT, True), "pycriu": (_STR, True), "criu": (_STR, True),
             "arch": (_STR, True), "kernel": (_STR, True), "features": (_FEATURES, True)}

#: Every message type of protocol version 1 and its fields.
MESSAGES: dict[str, dict[str, Any]] = {
    # agent -> client, first message of every session
    "welcome": {"protocol": (_INT, True), "agent": (_STR, True), "auth": (_STR, True),
                "nonce": ((str, _Opt), True)},
    "auth": {"nonce": (_STR, True), "mac": (_STR, True)},
    "auth-ok": {"mac": (_STR, True)},
    "hello": {**_VERSIONS, "mode": (_STR, False), "criu_check": (_BOOL, False),
              "criu_error": ((str, _Opt), False), "session": (_STR, False),
              "data_address": (_STR, False), "peer_address": ((str, _Opt), False),
              # page TLS (pagetls.py): the source asks, the agent answers with a certificate request
              "page_tls": (_BOOL, False), "tls_csr": ((str, _Opt), False),
              # a local agent: the device of its images directory, where it accepts hard links
              "link_dev": ((int, _Opt), False),
              "pid_ns": ((int, _Opt), False),
              # a container: its options and runtime target, checked by the agent (containers.py)
              "container": ((dict, _Opt), False)},
    "page-tls": {"cert": (_STR, True), "ca": (_STR, True)},
    "page-tls-ok": {},
    "ping": {"t": (_NUM, True)},
    "pong": {"t": (_NUM, True)},
    "prepare-dir": {"dir": (_STR, True), "parent": ((str, _Opt), True)},
    "dir-ready": {"dir": (_STR, True)},
    "page-server": {"dir": (_STR, True), "parent": ((str, _Opt), False), "address": ((str, _Opt), False),
                    "port": (_INT, False), "tls": (_BOOL, False)},
    "file": {"dir": (_STR, True), "name": (_STR, True), "size": (_INT, True),
             "ranges": ((list, _Opt), False)},
    # a local agent (same host, same filesystem) takes an image by hard link instead of a copy
    "file-link": {"dir": (_STR, True), "name": (_STR, True), "size": (_INT, True), "path": (_STR, True)},
    "files-done": {"dir": (_STR, True), "count": (_INT, True), "bytes": (_INT, True)},
    "files-ok": {"count": (_INT, True), "bytes": (_INT, True)},
    "lazy-pages": {"dir": (_STR, True), "page_server": (_ADDRESS, True), "tls": (_BOOL, False)},
    "restore": {"dir": (_STR, True), "lazy": (_BOOL, True),
                "page_server": ((_ADDRESS, _Opt), True), "flags": (dict, True), "tls": (_BOOL, False)},
    "restored": {"pid": (_INT, True), "resumed_ago": (_NUM, True), "restore_seconds": (_NUM, True),
                 "lazy_daemon_seconds": ((int, float, _Opt), True), "stats": ((dict, _Opt), True),
                 "page_server_wait": (_NUM, True),
                 # CRIU's notifications during the restore: action -> seconds after it began
                 "criu_marks": ((dict, _Opt), False)},
    # before the freeze: what the live tree needs from the destination, checked there
    "preflight": {"files": (list, True), "tcp_ports": (list, True), "unix_paths": (list, True),
                  # the source's ``criu cpuinfo dump`` image, base64 (absent on one host)
                  "cpuinfo": (_STR, False)},
    "preflight-ok": {"problems": (list, True)},
    "commit": {},
    "committed": {"pid": (_INT, True), "resumed_ago": (_NUM, False)},
    "abort": {"reason": (_STR, True)},
    "aborted": {"killed": ((int, _Opt), True)},
    "lazy-wait": {"timeout": (_NUM, True)},
    "lazy-done": {"ok": (_BOOL, True), "status": ((int, _Opt), True), "error": ((str, _Opt), True),
                  "killed": ((int, _Opt), True), "seconds": (_NUM, True), "pages": ((int, _Opt), True),
                  "uncork": ((str, _Opt), False)},
    "logs": {},
    # hybrid: the pagemaps a pre-dump's page server wrote, back to the source (whose lazy final
    # dump must see its parent's pagemaps locally to leave the pre-copied pages out)
    "pagemaps": {"dir": (_STR, True)},
    # one host, the source ended by its dump: the pages its CRIU sent to the destination's page
    # server come back (by hard link where the filesystem allows) as the source's rollback
    "page-images": {"dir": (_STR, True)},
    "bye": {"disk": ((dict, _Opt), False), "memory": ((dict, _Opt), False)},
    "error": {"code": (_STR, True), "message": (_STR, True)},
}

#: Who may send which message (the receiver refuses the rest).
FROM_CLIENT = frozenset({"auth", "hello", "page-tls", "ping", "preflight",
                         "prepare-dir", "page-server", "file", "file-link", "files-done", "files-ok",
                         "lazy-pages",
                         "restore", "commit",
                         "abort", "lazy-wait", "logs", "page-images", "pagemaps", "bye"})
FROM_AGENT = frozenset({"welcome", "auth-ok", "hello", "page-tls-ok", "preflight-ok",
                        "pong", "dir-ready", "page-server", "file", "file-link", "files-done",
                        "files-ok", "restored", "committed", "aborted", "lazy-done", "bye", "error"})


def _check_fields(where: str, value: Any, spec: Mapping[str, Any]) -> None:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object")
    unknown = set(value) - set(spec) - ({"type"} if where.count(".") == 0 else set())
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(unknown)}")
    for name, (types, required) in spec.items():
        if name not in value:
            if required:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        item = value[name]
        if isinstance(types, dict):
            _check_fields(f"{where}.{name}", item, types)
            continue
        if isinstance(types, tuple) and len(types) == 2 and isinstance(types[0], dict):
            if item is None and types[1] is _Opt:
                continue
            _check_fields(f"{where}.{name}", item, types[0])
            continue
        tuple_types = types if isinstance(types, tuple) else (types,)
        if isinstance(item, bool) and bool not in tuple_types:
            raise ProtocolError(f"{where}.{name}: expected {_names(tuple_types)}, got a boolean")
        if not isinstance(item, tuple_types):
            raise ProtocolError(f"{where}.{name}: expected {_names(tuple_types)}, got {type(item).__name__}")
        if isinstance(item, str) and len(item) > 4096:
            raise ProtocolError(f"{where}.{name}: string too long")
        if isinstance(item, int) and not isinstance(item, bool) and not -(1 << 63) <= item < (1 << 64):
            raise ProtocolError(f"{where}.{name}: integer out of range")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _Opt else t.__name__ for t in types)


def validate(msg: Any, *, sender: str) -> dict[str, Any]:
    """Check a decoded control message from ``sender`` ("client" or "agent"); return it."""
    if not isinstance(msg, dict):
        raise ProtocolError("control message is not a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}")
    allowed = FROM_CLIENT if sender == "client" else FROM_AGENT
    if kind not in allowed:
        raise ProtocolError(f"a {sender} may not send {kind!r}")
    _check_fields(kind, msg, MESSAGES[kind])
    return msg


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


def encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def decode(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"control frame is not valid JSON: {exc}") from None


def finite(value: float) -> float:
    """JSON has no NaN/inf: clamp a float for a message."""
    return value if math.isfinite(value) else 0.0
