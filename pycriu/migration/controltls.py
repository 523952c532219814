"""TLS for the control channel of a ``tcp://`` agent that only has a shared secret.

In classic mode the control channel carries every image, the ``pages-*.img`` files included: a
process's memory (keys, tokens, user data). A MAC keeps it from being altered but not from being
read, so over ``tcp://`` the channel runs inside TLS by default, also when the two sides share
nothing but a secret:

* the agent makes a throw-away key and a self-signed certificate when it starts listening (kept
  in memory: the PEM files live in a 0700 temporary directory only while the SSL context loads
  them);
* the source connects with TLS without checking that certificate against any CA: nobody vouches
  for it;
* the shared secret's challenge-response (:func:`pycriu.migration.protocol.agent_authenticate`)
  then runs *inside* TLS and covers the SHA-256 of the agent's certificate as each side saw it
  (channel binding, as ``tls-server-end-point`` in RFC 5929). A machine in the middle would have
  to present its own certificate: the two hashes differ, neither side's proof verifies, and it
  cannot make new ones without the secret.

With the user's own certificates (``TLSConfig``) the same binding is added to the secret's proof
when both are given. Plain, MAC'd frames remain only behind the explicit ``insecure_plaintext``
opt-out of both sides.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["AgentIdentity", "client_context", "binding_of", "binding_of_file", "TLS_MINIMUM"]

TLS_MINIMUM = ssl.TLSVersion.TLSv1_2
_VALIDITY = datetime.timedelta(days=3650)  # nobody checks it: the binding authenticates the key


class AgentIdentity:
    """The agent's throw-away key and self-signed certificate, and the server context using them."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pycriu agent (bound by the shared secret)")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + _VALIDITY)
                .sign(key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        #: what both sides put into the secret's proofs: SHA-256 of the certificate, hex
        self.binding = hashlib.sha256(der).hexdigest()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = TLS_MINIMUM
        directory = Path(tempfile.mkdtemp(prefix="pycriu-agent-tls-", dir=_memory_dir()))
        try:
            (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path = directory / "key.pem"
            with key_path.open("xb") as f:  # mkdtemp made the directory 0700: nobody else reads it
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
            self._context.load_cert_chain(directory / "cert.pem", key_path)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def server_context(self) -> ssl.SSLContext:
        return self._context


def client_context() -> ssl.SSLContext:
    """The source's TLS context towards an agent that has only the shared secret: encryption now,
    authentication by the secret's proofs over :func:`binding_of` right after."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = TLS_MINIMUM
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # vouched for by the shared secret, over the binding
    return ctx


def binding_of(sock: Any) -> str:
    """SHA-256 (hex) of the certificate the peer presented on a client TLS socket."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the agent presented no certificate")
    return hashlib.sha256(der).hexdigest()


def binding_of_file(cert_pem: str) -> str:
    """SHA-256 (hex) of the first certificate of a PEM file: the agent's own with ``TLSConfig``."""
    text = Path(cert_pem).read_text()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[text.index("-----BEGIN CERTIFICATE-----"):end])).hexdigest()


def _memory_dir() -> str | None:
    for d in ("/dev/shm", "/run"):
        if Path(d).is_dir():
            return d
    return None
