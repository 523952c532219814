"""Options of CRIU's daemons (``criu page-server``, ``criu lazy-pages``) and of the TLS they
share with a dump, shown by the effect: where and how verbosely a daemon logs, the status byte
a runtime waits on, and a revoked certificate refused only with the revocation list.
docs/options.rst lists every option with the test that proves it."""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_lazy_pages, needs_root

import pycriu
from pycriu.workload import Workload

pytestmark = [needs_root, pytest.mark.criu]

WorkloadFactory = Callable[..., Workload]


def _dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


@pytest.mark.parametrize("level", [pycriu.LogLevel.INFO, pycriu.LogLevel.DEBUG], ids=["info", "debug"])
def test_the_page_server_logs_into_work_dir_under_log_file_at_log_level(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path, level: pycriu.LogLevel) -> None:
    w = workload(mib=4)
    images, work = _dir(tmp_path, "images"), _dir(tmp_path, "work")
    opts = pycriu.PageServerOptions(images_dir=images, work_dir=work, log_file="ps-here.log", log_level=level)
    with criu.page_server(opts) as ps:
        criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_dir(tmp_path, "src"), leave_running=True,
                                     page_server=ps.address))
        assert ps.wait(timeout=30) == 0
    assert not list(images.glob("*.log")), "the log went to images_dir, not work_dir"
    log = (work / "ps-here.log").read_text()
    assert "page-xfer: Session over" in log  # it is the log of this page server's work
    assert ("page-xfer: Adding" in log) == (level == pycriu.LogLevel.DEBUG), "debug lines only at DEBUG"


@pytest.fixture
def plain_images(criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path) -> Path:
    """The images of a dump (the tree goes on running), in a directory for a lazy-pages daemon."""
    w = workload(mib=4)
    src = _dir(tmp_path, "src")
    criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=src, leave_running=True))
    images = _dir(tmp_path, "images")
    for image in src.glob("*.img"):
        shutil.copy2(image, images / image.name)
    return images


@pytest.mark.parametrize("level", [pycriu.LogLevel.INFO, pycriu.LogLevel.DEBUG], ids=["info", "debug"])
def test_the_lazy_pages_daemon_logs_into_work_dir_under_log_file_at_log_level(
        criu: pycriu.Criu, plain_images: Path, tmp_path: Path, level: pycriu.LogLevel) -> None:
    """It waits for a restore on ``lazy-pages.socket`` in work_dir, and says so at DEBUG."""
    work = _dir(tmp_path, "work")
    opts = pycriu.LazyPagesOptions(images_dir=plain_images, work_dir=work, log_file="lazy-here.log", log_level=level)
    with criu.lazy_pages(opts) as daemon:
        assert daemon.running
        assert (work / "lazy-pages.socket").is_socket()
    assert not list(plain_images.glob("*.log")), "the log went to images_dir, not work_dir"
    log = (work / "lazy-here.log").read_text()
    assert "Version:" in log
    assert ("Waiting for incoming connections on lazy-pages.socket" in log) == (level == pycriu.LogLevel.DEBUG)


def test_a_status_fd_gets_one_byte_once_the_lazy_pages_daemon_listens(
        criu: pycriu.Criu, plain_images: Path, tmp_path: Path) -> None:
    """As the page server's: one zero byte when the daemon is ready, and by then the socket a
    restore connects to is there."""
    work = _dir(tmp_path, "work")
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 16)
        with criu.lazy_pages(pycriu.LazyPagesOptions(images_dir=plain_images, work_dir=work, status_fd=w)):
            assert os.read(r, 16) == b"\0"
            assert (work / "lazy-pages.socket").is_socket()
    finally:
        os.close(r)
        os.close(w)


class _Pki:
    """A CA, a certificate for each end of the page connection, and a revocation list."""

    def __init__(self, d: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.hashes, self.serialization = x509, hashes, serialization
        self.dir = d
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pycriu test CA")])
        ca = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
              .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(self.now - datetime.timedelta(hours=1))
              .not_valid_after(self.now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(self.key, hashes.SHA256()))
        self.ca = self._pem("ca.pem", ca)
        self.serials: dict[str, int] = {}

    def _pem(self, name: str, obj: object) -> Path:
        path = self.dir / name
        path.write_bytes(obj.public_bytes(self.serialization.Encoding.PEM))  # type: ignore[attr-defined]
        return path

    def issue(self, who: str) -> dict[str, object]:
        """TLS options for ``who``'s end: its own key and certificate, and the CA."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        x509 = self.x509
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        self.serials[who] = serial
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who)])).issuer_name(self.name)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(self.now - datetime.timedelta(hours=1))
                .not_valid_after(self.now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, self.hashes.SHA256()))
        key_path = self.dir / f"{who}-key.pem"
        key_path.write_bytes(key.private_bytes(self.serialization.Encoding.PEM,
                                               self.serialization.PrivateFormat.PKCS8,
                                               self.serialization.NoEncryption()))
        return {"tls": True, "tls_cacert": self.ca, "tls_cert": self._pem(f"{who}-cert.pem", cert),
                "tls_key": key_path, "tls_no_cn_verify": True}

    def revoke(self, who: str) -> Path:
        """A revocation list of the CA that revokes ``who``'s certificate."""
        x509 = self.x509
        revoked = (x509.RevokedCertificateBuilder().serial_number(self.serials[who])
                   .revocation_date(self.now - datetime.timedelta(minutes=5)).build())
        crl = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
               .last_update(self.now - datetime.timedelta(minutes=5))
               .next_update(self.now + datetime.timedelta(days=1))
               .add_revoked_certificate(revoked).sign(self.key, self.hashes.SHA256()))
        return self._pem(f"crl-{who}.pem", crl)


@pytest.mark.parametrize("holder", ["page_server", "dump"])
def test_tls_cacrl_refuses_the_page_connection_of_a_revoked_certificate(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path, holder: str) -> None:
    """The page server (PageServerOptions.tls_cacrl) refuses a dump whose certificate the list
    revokes, and a dump (tls_cacrl) a page server whose certificate it revokes; the same
    certificates without the list make the connection."""
    pki = _Pki(_dir(tmp_path, "pki"))
    server_tls, dump_tls = pki.issue("page-server"), pki.issue("dump")
    crl = pki.revoke("dump" if holder == "page_server" else "page-server")
    w = workload(mib=4)

    def dump(name: str, with_crl: bool) -> None:
        server_kw = {**server_tls, "tls_cacrl": crl} if with_crl and holder == "page_server" else server_tls
        dump_kw = {**dump_tls, "tls_cacrl": crl} if with_crl and holder == "dump" else dump_tls
        with criu.page_server(pycriu.PageServerOptions(images_dir=_dir(tmp_path, f"{name}-dst"),
                                                       **server_kw)) as ps:  # type: ignore[arg-type]
            criu.dump(pycriu.DumpOptions(pid=w.pid, images_dir=_dir(tmp_path, f"{name}-src"), leave_running=True,
                                         page_server=ps.address, **dump_kw))  # type: ignore[arg-type]
            assert ps.wait(timeout=30) == 0

    dump("trusted", with_crl=False)
    assert list((tmp_path / "trusted-dst").glob("pages-*.img"))
    with pytest.raises(pycriu.CriuError):  # a DumpError, or the ServiceError of CRIU's exit
        dump("revoked", with_crl=True)
    assert w.alive()
    log = (tmp_path / ("revoked-dst/page-server.log" if holder == "page_server" else "revoked-src/dump.log"))
    assert "revoked" in log.read_text().lower(), "CRIU did not name the revocation"


@pytest.fixture
def slow_criu(criu: pycriu.Criu, tmp_path: Path) -> pycriu.Criu:
    """A Criu whose binary takes a second and a half to start (then execs the real one)."""
    wrapper = tmp_path / "slow-criu"
    wrapper.write_text(f'#!/bin/sh\nsleep 1.5\nexec {criu.binary} "$@"\n')
    wrapper.chmod(0o755)
    return pycriu.Criu(binary=wrapper)


@pytest.mark.parametrize("daemon", ["page_server", "lazy_pages"])
def test_timeout_is_how_long_pycriu_waits_for_the_daemon_to_be_ready(
        slow_criu: pycriu.Criu, plain_images: Path, tmp_path: Path, daemon: str) -> None:
    """pycriu's own wait for the daemon's status byte: a slow daemon is given up on (and
    stopped) after ``timeout``, and is waited for with a longer one."""
    def options(timeout: float) -> pycriu.PageServerOptions | pycriu.LazyPagesOptions:
        if daemon == "page_server":
            return pycriu.PageServerOptions(images_dir=plain_images, timeout=timeout)
        return pycriu.LazyPagesOptions(images_dir=plain_images, work_dir=tmp_path, timeout=timeout)

    start = getattr(slow_criu, daemon)
    with pytest.raises(pycriu.CriuError, match=r"did not become ready within 0\.3 s") as info:
        with start(options(0.3)):
            pass
    assert info.value.operation == daemon.replace("_", "-")
    with start(options(30)) as ready:
        assert ready.running


@needs_lazy_pages
@pytest.mark.parametrize("revoked", [False, True], ids=["trusted", "revoked"])
def test_lazy_pages_tls_cacrl_refuses_a_source_whose_certificate_is_revoked(
        criu: pycriu.Criu, workload: WorkloadFactory, tmp_path: Path, revoked: bool) -> None:
    """A lazy migration over TLS: the lazy-pages daemon connects to the source's page server
    once the restore has handed it the tree; with a list revoking the source's certificate it
    refuses that connection (and the restore fails), without it every page arrives."""
    from test_lazy_pages import LazyDump, free_port

    pki = _Pki(_dir(tmp_path, "pki"))
    source_tls, dest_tls = pki.issue("source"), pki.issue("destination")
    if revoked:
        dest_tls["tls_cacrl"] = pki.revoke("source")
    w = workload(mib=4)
    src, dst, work = _dir(tmp_path, "src"), _dir(tmp_path, "dst"), _dir(tmp_path, "work")
    port = free_port()
    dump = LazyDump(criu, pycriu.DumpOptions(pid=w.pid, images_dir=src, lazy_pages=True, lazy_port=port,
                                             lazy_address="127.0.0.1", **source_tls))  # type: ignore[arg-type]
    dump.start()
    assert dump.images_written.wait(30) and dump.serving.wait(30) and dump.error is None, dump.error
    for image in src.glob("*.img"):
        shutil.copy2(image, dst / image.name)
    daemon_opts = pycriu.LazyPagesOptions(images_dir=dst, work_dir=work, page_server=pycriu.PageServerAddress(
        "127.0.0.1", port), **dest_tls)  # type: ignore[arg-type]
    try:
        with criu.lazy_pages(daemon_opts) as daemon:
            if not revoked:
                w.adopt(criu.restore(pycriu.RestoreOptions(images_dir=dst, work_dir=work, lazy_pages=True)).pid)
                assert daemon.wait(timeout=30) == 0
                w.wait_beats(3)
                assert w.checksum() == w.expected_checksum
                return
            with pytest.raises(pycriu.RestoreError):
                criu.restore(pycriu.RestoreOptions(images_dir=dst, work_dir=work, lazy_pages=True))
            with pytest.raises(pycriu.LazyPagesError):
                daemon.wait(timeout=30)
        assert "The certificate chain is revoked" in (work / "lazy-pages.log").read_text()
    finally:
        dump.join(30)
