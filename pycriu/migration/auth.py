"""The agent protocol's authentication: the shared secret's challenge-response (bound to the
agent's TLS certificate when there is TLS, :mod:`.controltls`), then MAC'd frames without TLS."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from .channel import Channel
from .errors import AgentError, AuthenticationError, ProtocolError, TransportError
from .messages import _HEX64, PROTOCOL_VERSION

# --- Authentication -----------------------------------------------------------------------------


def _auth_mac(secret: bytes, label: str, a: str, b: str, binding: str | None) -> str:
    """A side's proof that it holds the secret, for these nonces; inside TLS it also covers the
    agent's certificate as this side saw it (``binding``: :mod:`.controltls`)."""
    text = f"pycriu-auth-v1|{label}|{a}|{b}" if binding is None else f"pycriu-auth-tls-v1|{label}|{a}|{b}|{binding}"
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def _session_key(secret: bytes, a: str, b: str) -> bytes:
    return hmac.new(secret, f"pycriu-session-v1|{a}|{b}".encode(), hashlib.sha256).digest()


def agent_authenticate(channel: Channel, secret: bytes | None, agent_name: str, *, binding: str | None = None,
                       failure_delay: float = 0.2, timeout: float = 30.0) -> None:
    """Agent side: send ``welcome``; with a secret, run the challenge-response, over TLS bound to
    the agent's certificate (``binding``, its SHA-256), else followed by MAC'd frames. Raises
    :class:`AuthenticationError` (after telling the client) on failure."""
    nonce = secrets.token_hex(32) if secret is not None else None
    channel.send({"type": "welcome", "protocol": PROTOCOL_VERSION, "agent": agent_name,
                  "auth": "secret" if secret is not None else "none", "nonce": nonce})
    if secret is None:
        return
    assert nonce is not None
    try:
        msg = channel.recv("auth", timeout=timeout)
    except (ProtocolError, AgentError) as exc:
        _refuse(channel, failure_delay)
        raise AuthenticationError(f"client did not authenticate: {exc}") from None
    theirs = msg["nonce"]
    if not _HEX64.fullmatch(theirs) or not _HEX64.fullmatch(msg["mac"]) or not hmac.compare_digest(
            msg["mac"], _auth_mac(secret, "client", nonce, theirs, binding)):
        _refuse(channel, failure_delay)
        raise AuthenticationError("client failed authentication (wrong shared secret, or a machine in the middle "
                                  "of the TLS connection)")
    channel.send({"type": "auth-ok", "mac": _auth_mac(secret, "agent", nonce, theirs, binding)})
    if binding is None:  # plain TCP (the explicit opt-out): at least nothing can be altered
        channel.enable_mac(_session_key(secret, nonce, theirs))


def _refuse(channel: Channel, delay: float) -> None:
    time.sleep(delay)  # slow down guessing
    try:
        channel.send({"type": "error", "code": "auth-failed", "message": "authentication failed"})
    except (TransportError, ProtocolError):
        pass


def client_authenticate(channel: Channel, secret: bytes | None, *, require: bool,
                        binding: str | None = None) -> dict[str, Any]:
    """Client side: read ``welcome``; answer the challenge when the agent asks for a secret.

    ``require``: refuse an agent that does not authenticate with the secret (nothing else
    vouches for the peer). ``binding``: inside TLS, the SHA-256 of the certificate the agent
    presented, which both proofs cover. Returns the welcome message.
    """
    welcome = channel.recv("welcome", timeout=30.0)
    if welcome["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(f"agent speaks protocol {welcome['protocol']}, this pycriu speaks {PROTOCOL_VERSION}")
    if welcome["auth"] == "none":
        if require:
            raise AuthenticationError(
                "the agent does not authenticate itself: refusing plain TCP without a shared secret",
                hint="start the agent with --secret-file (or use TLS with client certificates)")
        return welcome
    if welcome["auth"] != "secret":
        raise ProtocolError(f"agent offers unknown authentication {welcome['auth']!r}")
    if secret is None:
        raise AuthenticationError("the agent requires a shared secret and none was given",
                                  hint="pass secret=... (pycriu migrate --secret-file FILE)")
    nonce_a = welcome["nonce"]
    if not isinstance(nonce_a, str) or not _HEX64.fullmatch(nonce_a):
        raise ProtocolError("agent sent a malformed challenge")
    nonce_b = secrets.token_hex(32)
    channel.send({"type": "auth", "nonce": nonce_b, "mac": _auth_mac(secret, "client", nonce_a, nonce_b, binding)})
    try:
        reply = channel.recv("auth-ok")
    except AgentError as exc:
        raise AuthenticationError(f"the agent refused the shared secret ({exc.code})",
                                  hint="check that both sides use the same secret") from None
    if not hmac.compare_digest(reply["mac"], _auth_mac(secret, "agent", nonce_a, nonce_b, binding)):
        raise AuthenticationError("the agent failed to prove it knows the shared secret (or a machine in the "
                                  "middle of the TLS connection answered)")
    if binding is None:
        channel.enable_mac(_session_key(secret, nonce_a, nonce_b))
    return welcome
