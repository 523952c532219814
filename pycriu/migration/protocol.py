"""The agent protocol, version 1: frames, messages, authentication and file streaming (one
module each: :mod:`.messages`, :mod:`.channel`, :mod:`.auth`, :mod:`.files`; this module gathers
their names).

Wire format (both directions)::

    frame   = kind:u8  length:u32be  payload[length]  [mac[32]]
    kind    = 1 (control: one JSON object, UTF-8, at most 1 MiB)
            | 2 (data: raw bytes of a file being streamed, at most 1 MiB per frame)
    mac     = HMAC-SHA256(session_key, direction || seq:u64be || kind || length || payload)
              present only once a shared-secret session is established

Every control message is a JSON object with a ``type`` and a fixed set of typed fields
(:data:`MESSAGES`); anything else (unknown type, unknown or missing field, wrong type, duplicate
key, NaN, oversize frame) is a :class:`~pycriu.ProtocolError` and ends the session. JSON is the
only decoder: no pickle, no eval.

A file travels as one ``file`` control message (``dir``, ``name``, ``size`` and, for a sparse file,
the byte ``ranges`` that follow) and then data frames carrying exactly that many bytes. The
receiver checks the name against :data:`IMAGE_NAME` (or :data:`LOG_NAME`), creates the file with
``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to a directory fd it opened itself, and enforces size limits
before writing.

Authentication (``tcp://`` with a shared secret): the agent's ``welcome`` carries a random nonce
``A``; the client answers with its own nonce ``B`` and an HMAC under the secret of both (and,
inside TLS, of the SHA-256 of the agent's certificate: :mod:`.controltls`); the agent checks it
with a constant-time compare and proves it knows the secret the same way. Over ``tcp://`` this
runs inside TLS by default. Only with the explicit ``insecure_plaintext`` opt-out (no TLS) does
every frame then carry a MAC under ``HMAC(secret, "pycriu-session-v1|" A B)`` with per-direction
sequence numbers, so frames cannot be forged, replayed, reordered or dropped unnoticed.
"""

from __future__ import annotations

from .auth import agent_authenticate, client_authenticate
from .channel import (
    CHUNK,
    KIND_CONTROL,
    KIND_DATA,
    MAC_SIZE,
    MAX_CONTROL,
    MAX_DATA,
    ZERO_COPY,
    Channel,
    ChannelStats,
    Stream,
)
from .files import Limits, accept_link, link_file, receive_file, send_file, send_files
from .messages import (
    DIR_NAME,
    FROM_AGENT,
    FROM_CLIENT,
    IMAGE_NAME,
    LOG_NAME,
    MESSAGES,
    PAGE_IMAGE,
    PROTOCOL_VERSION,
    agent_error,
    check_dir_name,
    check_image_name,
    decode,
    encode,
    finite,
    validate,
)

__all__ = [
    "PROTOCOL_VERSION", "MESSAGES", "FROM_CLIENT", "FROM_AGENT", "IMAGE_NAME", "LOG_NAME", "PAGE_IMAGE", "DIR_NAME",
    "KIND_CONTROL", "KIND_DATA", "MAC_SIZE", "MAX_CONTROL", "MAX_DATA", "CHUNK", "ZERO_COPY",
    "Channel", "Stream", "ChannelStats", "Limits", "agent_error", "check_image_name", "check_dir_name", "validate",
    "encode", "decode", "finite", "send_file", "send_files", "receive_file", "link_file", "accept_link",
    "client_authenticate", "agent_authenticate",
]
