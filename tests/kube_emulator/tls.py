"""Certificates made at test time: a CA, the server's certificate for 127.0.0.1, client certificates.

As in Kubernetes, a client certificate's common name is the user and its organisations the groups.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
    pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


class CertificateAuthority:
    """A self-signed CA in `directory` (ca.crt, ca.key) that signs server and client certificates."""

    def __init__(self, directory: Path, name: str = "emulator-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5))
                      .not_valid_after(now + datetime.timedelta(days=1))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.pair = _write(directory, "ca", self._cert, self._key)

    @property
    def cert_path(self) -> Path:
        return self.pair.cert

    def _issue(self, stem: str, subject: x509.Name, usage: x509.ObjectIdentifier,
               san: list[x509.GeneralName] | None = None) -> KeyPair:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return _write(self.directory, stem, builder.sign(self._key, hashes.SHA256()), key)

    def server(self) -> KeyPair:
        san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        return self._issue("server", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
                           ExtendedKeyUsageOID.SERVER_AUTH, san)

    def client(self, user: str, groups: tuple[str, ...] = (), stem: str = "") -> KeyPair:
        names = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        names += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        return self._issue(stem or f"client-{len(list(self.directory.glob('client-*.crt')))}", x509.Name(names),
                           ExtendedKeyUsageOID.CLIENT_AUTH)

    def server_context(self) -> ssl.SSLContext:
        """TLS for the server: its certificate, client certificates optional and checked against the CA."""
        pair = self.server()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pair.cert, pair.key)
        context.load_verify_locations(self.cert_path)
        context.verify_mode = ssl.CERT_OPTIONAL
        return context


def client_identity(peercert: dict[str, object] | None) -> tuple[str, tuple[str, ...]] | None:
    """(user, groups) from a verified client certificate (`SSLObject.getpeercert()`), as Kubernetes reads it."""
    if not peercert:
        return None
    user, groups = "", []
    for rdn in peercert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                user = value
            elif key == "organizationName":
                groups.append(value)
    return (user, tuple(groups)) if user else None
