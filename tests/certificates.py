"""Real X.509 certificates made on the spot: a CA, a server certificate, a client certificate.

Written as PEM files, the way an operator hands them to UMBRA_TLS_* (EC P-256 keys: quick
to make, and grpc's TLS stack accepts them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A certificate authority that signs the certificates of one test."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_file: Path

    @classmethod
    def create(cls, folder: Path, name: str = "umbra test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _builder(name, name, key.public_key(), ca=True).sign(key, hashes.SHA256())
        cert_file = folder / f"{_slug(name)}.crt"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, cert, cert_file)

    def issue(
        self, folder: Path, subject: str, *, server: bool = False, ip: str = "127.0.0.1"
    ) -> Pair:
        """A leaf certificate for a server (with `ip` as its address) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = _builder(subject, self.name, key.public_key(), ca=False).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pair = Pair(folder / f"{_slug(subject)}.crt", folder / f"{_slug(subject)}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(private_pem(key))
        return pair


def private_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """The key as PKCS#8 PEM, encrypted when a password is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _builder(
    subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey, *, ca: bool
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def _slug(name: str) -> str:
    return name.replace(" ", "-")
