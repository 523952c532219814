"""Per-migration TLS for CRIU's own page connections (page server, lazy pages).

pycriu's control channel is protected by its transport (OpenSSH, TLS, or a shared secret's MAC),
but the pages travel on CRIU's own TCP connections, which are plaintext unless CRIU is given
certificates (``--tls``: GnuTLS, both peers present a certificate signed by the CA it is told to
trust). Without certificates from the user, each migration makes its own:

* the agent makes a key and a certificate request (CSR) and sends the CSR in its ``hello``
  reply, over the authenticated control channel: no private key ever travels;
* the source makes a throw-away CA, signs its own certificate and the agent's, sends the agent
  its certificate and the CA certificate, and forgets the CA key.

Only the two holders of this migration's certificates can then open, or answer, a page
connection; anyone else on the path sees ciphertext. CRIU's host-name check (the certificate must
name the address it connects to) is turned off: the CA vouches for exactly these two keys, and the
data addresses are not known when the certificates are made.

``cryptography`` is imported only when a migration asks for this (it costs ~50 ms).
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProtocolError

__all__ = ["PageTLS", "Authority", "new_request", "install", "MAX_PEM"]

#: Largest PEM accepted from the peer (a P-256 certificate or request is well under 1 KiB).
MAX_PEM = 8192
_VALIDITY = datetime.timedelta(days=1)
_SKEW = datetime.timedelta(minutes=10)  # the two hosts' clocks may differ a little


@dataclass(frozen=True)
class PageTLS:
    """One side's PEM files for CRIU's page connections."""

    cert: Path
    key: Path
    ca: Path

    def criu_options(self) -> dict[str, Any]:
        """The CRIU options (``DumpOptions``, ``PageServerOptions``, ...) that use these files."""
        return {"tls": True, "tls_cacert": self.ca, "tls_cert": self.cert, "tls_key": self.key,
                "tls_no_cn_verify": True}


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_key(directory: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    _write(directory / "key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return key


def _csr(key: Any) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    request = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pycriu page connection")])).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def new_request(directory: str | os.PathLike[str]) -> str:
    """Make this side's key in ``directory`` (0600) and return its certificate request (PEM)."""
    return _csr(_new_key(Path(directory))).decode()


def install(directory: str | os.PathLike[str], cert_pem: str, ca_pem: str) -> PageTLS:
    """Store the certificate the peer issued for the key :func:`new_request` made, and its CA.

    Raises :class:`ProtocolError` unless ``cert_pem`` is a certificate for that very key, signed
    by ``ca_pem``."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    directory = Path(directory)
    if len(cert_pem) > MAX_PEM or len(ca_pem) > MAX_PEM:
        raise ProtocolError("page TLS: certificate too large")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError(f"page TLS: not a certificate issued by the given CA: {exc!r}") from None
    key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), password=None)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, raw) != key.public_key().public_bytes(
            serialization.Encoding.DER, raw):
        raise ProtocolError("page TLS: the certificate is not for this side's key")
    _write(directory / "cert.pem", cert_pem.encode())
    _write(directory / "ca.pem", ca_pem.encode())
    return PageTLS(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")


class Authority:
    """A throw-away CA for one migration: it signs the source's and the agent's certificates."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pycriu migration CA {secrets.token_hex(8)}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._name = name
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - _SKEW).not_valid_after(now + _VALIDITY)
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                   key_encipherment=False, data_encipherment=False,
                                                   key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))

    @property
    def ca_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, csr_pem: str) -> str:
        """A certificate (PEM) for the key of ``csr_pem``, good for both ends of a connection."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        if len(csr_pem) > MAX_PEM:
            raise ProtocolError("page TLS: certificate request too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise ProtocolError(f"page TLS: not a certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise ProtocolError("page TLS: the certificate request's signature is invalid")
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self._name)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _SKEW).not_valid_after(now + _VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue_local(self, directory: str | os.PathLike[str]) -> PageTLS:
        """This side's own key and certificate, in ``directory``."""
        return install(directory, self.sign(new_request(directory)), self.ca_pem)
